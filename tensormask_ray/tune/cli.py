"""`tensormask-ray sweep SPEC.yaml [key=value ...]` and `tensormask-ray sweep --resume NAME`."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="the sweep spec (see sweeps/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="base-config overrides, e.g. data.train_shards=DIR (a searched key given here is pinned to that value)",
    )
    p.add_argument(
        "--resume",
        metavar="NAME",
        help="continue the interrupted sweep NAME (finished trials are kept)",
    )
    p.add_argument("--name", help="the sweep's name (default: the spec's `name`)")
    p.add_argument(
        "--storage-path",
        metavar="URI",
        help="where sweeps live (default: the base config's train.storage_path)",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local one; `local` forces a new one)",
    )


def pin_searched_keys(spec, overrides: list[str]):
    """An override of a searched key pins it: `model.upscale_factor=5` runs the spec's other
    dimensions at lambda 5 only."""
    from ..config import parse_override
    from .spec import SpecError

    pinned = [k for k, _ in map(parse_override, overrides) if k in spec.search]
    if not pinned:
        return spec
    search = {k: v for k, v in spec.search.items() if k not in pinned}
    if not search:
        raise SpecError(
            f"sweep spec {spec.source}: the overrides pin every searched key ({', '.join(pinned)}): nothing left to sweep"
        )
    print(f"[sweep] pinned by the command line: {', '.join(pinned)}", flush=True)
    return dataclasses.replace(spec, search=search)


def run(args: argparse.Namespace) -> int:
    from .spec import load_spec, validate_spec
    from .sweep import resume_sweep, run_sweep

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if args.resume:
        if args.spec or args.overrides:
            raise UserError("--resume NAME takes no spec or overrides: the sweep keeps its own")
        outcome = resume_sweep(
            args.resume,
            storage_path=args.storage_path or "runs",
            address=address,
            mlflow_uri=args.mlflow_uri,
        )
    else:
        if not args.spec:
            raise UserError("give a sweep spec (e.g. sweeps/cpu/smoke.yaml), or --resume NAME")
        spec = load_spec(args.spec)
        if args.name:
            spec = dataclasses.replace(spec, name=args.name)
        spec = pin_searched_keys(spec, args.overrides)
        validate_spec(spec)
        outcome = run_sweep(
            spec,
            args.overrides,
            storage_path=args.storage_path,
            mlflow_uri=args.mlflow_uri,
            address=address,
        )
    if outcome.interrupted:
        return 130
    failed = [t for t in outcome.trials if t["status"] == "ERROR"]
    return 1 if failed else 0
