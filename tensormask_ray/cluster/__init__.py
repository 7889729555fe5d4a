"""Running tensormask-ray commands on a Ray cluster: `tensormask-ray submit` and `tensormask-ray
jobs` (`cli.py`, `jobs_cli.py`: parsing and printing over `api.submit` and the API's job
functions, which run `submission.py` and `jobs.py`) over the Ray Jobs SDK (`client.py`), what a
job ships and carries (`job.py`: `working_dir.py`, `shared_paths.py`, `job_env.py`,
`code_package.py`), the cluster's auth token (`auth.py`), and a preflight job (`check.py`). The
cluster configs are in the repository's `cluster/` folder; the walk-through in docs/cluster.md."""
