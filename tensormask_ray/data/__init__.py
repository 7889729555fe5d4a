"""Data: COCO -> Parquet shards (`coco_to_parquet`, the resumable driver, over `coco_records`,
`coco_geometry`, `image_files` and `shard_writer`; `manifest`, `schema`), Ray Data streaming to
the training workers (`dataset`), transforms shared with inference (`transforms`), and data sets
anyone can make (`synth`, `imgviz_set`). Submodules are imported where used (Ray is heavy)."""
