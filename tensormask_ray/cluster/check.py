"""The body of `tensormask-ray submit check`: a short job that tells whether a cluster can run our
jobs, before a sweep finds out the hard way.

It reports (never printing environment values, which may hold credentials): where
`tensormask_ray` was imported from (the installed copy, or one shipped with --ship-code), whether
its compiled kernels load and for which devices, torch/CUDA on the node running the driver, the
cluster's resources (which also proves the driver can join the cluster, token auth included),
whether the MLflow store answers, and whether the storage path is writable from the cluster.
`--list-files` lists what arrived in the job's working dir. `--hold SECONDS` keeps it alive afterwards, printing a heartbeat (to try log following and
`jobs stop`). Exits 1 if a check failed.

Run as `python -m tensormask_ray.cluster.check [--storage-path URI] [--hold SECONDS]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid


def _line(name: str, ok: bool | None, detail: str) -> None:
    mark = {True: "ok", False: "FAIL", None: "--"}[ok]
    print(f"[check] {name:<18} {mark:<4} {detail}", flush=True)


def _package() -> bool:
    try:
        import tensormask_ray
    except ImportError as e:
        _line(
            "tensormask_ray",
            False,
            f"not importable ({e}); install it on the cluster (cluster/Dockerfile) or use --ship-code",
        )
        return False
    where = os.path.dirname(tensormask_ray.__file__)
    shipped = "runtime_resources" in where
    _line(
        "tensormask_ray",
        True,
        f"{tensormask_ray.__version__} from {where} ({'shipped with the job' if shipped else 'installed'})",
    )
    return True


def _kernels() -> bool:
    import torch

    _line(
        "torch",
        True,
        f"{torch.__version__}, CUDA {torch.version.cuda}, GPUs visible here: {torch.cuda.device_count()}",
    )
    try:
        from tensormask_ray.ops.build_info import kernel_table
        from tensormask_ray.ops.library import ensure_loaded

        ensure_loaded()
    except ImportError as e:
        _line("kernels", False, str(e).splitlines()[0][:300])
        return False
    table = kernel_table()
    devices = [d for d in ("CPU", "CUDA") if all(row[d] for row in table.values())]
    _line(
        "kernels",
        True,
        f"tensormask_ray._C loaded: {len(table)} ops, kernels for {'+'.join(devices) or 'none'}",
    )
    return bool(devices)


def _cluster() -> bool:
    import ray

    try:
        ray.init(logging_level="ERROR", log_to_driver=False)
        res = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
    except Exception as e:  # noqa: BLE001 - reported, not raised
        _line("ray cluster", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return False
    summary = ", ".join(
        f"{k} {v:g}"
        for k, v in sorted(res.items())
        if k in ("CPU", "GPU", "memory") or k.startswith("accelerator")
    )
    _line("ray cluster", True, f"Ray {ray.__version__}, {nodes} node(s): {summary}")
    return True


def _mlflow() -> bool | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        _line("mlflow", None, "MLFLOW_TRACKING_URI not set for this job")
        return None
    from tensormask_ray.errors import UserError
    from tensormask_ray.tracking import check_tracking_uri

    shown = uri.split("@")[-1] if "@" in uri else uri
    try:
        check_tracking_uri(uri)
    except UserError as e:
        _line("mlflow", False, str(e))
        return False
    _line("mlflow", True, f"store {shown} reachable")
    return True


def _storage(path: str) -> bool | None:
    if not path:
        _line("storage", None, "no --storage-path given")
        return None
    import pyarrow.fs

    try:
        if "://" in path:
            fs, base = pyarrow.fs.FileSystem.from_uri(path)
        else:
            fs, base = pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
        probe = f"{base.rstrip('/')}/.tensormask-check-{uuid.uuid4().hex[:8]}"
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        _line("storage", False, f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return False
    _line("storage", True, f"{path} writable from the cluster")
    return True


def build_parser() -> argparse.ArgumentParser:
    """The job's options (what `tensormask-ray submit check ARGS` passes on)."""
    p = argparse.ArgumentParser(
        prog="tensormask-ray submit check", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--storage-path", default="", help="check that this folder/URI is writable from the cluster"
    )
    p.add_argument(
        "--hold", type=float, default=0.0, metavar="SECONDS", help="stay alive this long afterwards"
    )
    p.add_argument("--no-ray", action="store_true", help="skip joining the cluster (faster)")
    p.add_argument(
        "--list-files", action="store_true", help="list the files shipped in the job's working dir"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"[check] job running in {os.getcwd()} with Python {sys.version.split()[0]}", flush=True)
    if args.list_files:
        for root, dirs, files in os.walk("."):
            dirs.sort()
            for name in sorted(files):
                print(f"[check] shipped: {os.path.relpath(os.path.join(root, name))}", flush=True)
    results = [_package()]
    if results[0]:
        results.append(_kernels())
    if not args.no_ray:
        results.append(_cluster())
    results += [_mlflow(), _storage(args.storage_path)]
    ok = all(r is not False for r in results)
    print(f"[check] {'all checks passed' if ok else 'some checks FAILED'}", flush=True)
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline:
        print(f"[check] holding, {deadline - time.monotonic():.0f} s left", flush=True)
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
