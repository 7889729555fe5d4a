"""Command-line options shared by `evaluate` and `predict`: which model, the paper's test-time
settings (as config overrides), and how inference is spread over Ray actors."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..console import add_address_argument
from ..errors import UserError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="PATH", help="checkpoint folder (or its state.pt)")
    g.add_argument(
        "--mlflow-run",
        metavar="ID",
        help="the MLflow run of a training: evaluates its best checkpoint (with --checkpoint: "
        "the run to log to)",
    )
    g.add_argument(
        "--best-of", metavar="SWEEP", help="the best trial's checkpoint of a sweep (Ray Tune)"
    )
    g.add_argument("--sweep-storage", metavar="DIR", help="where the sweep's trials are stored")
    g.add_argument(
        "--model",
        metavar="URI",
        help="a registered MLflow model: models:/NAME/VERSION, models:/NAME/latest or "
        "models:/NAME@ALIAS (downloaded into --out)",
    )
    g.add_argument(
        "--mlflow-uri",
        default="",
        metavar="URI",
        help="MLflow store (default: the checkpoint config's, else MLFLOW_TRACKING_URI, else "
        "./mlflow.db)",
    )


def add_test_time_arguments(
    parser: argparse.ArgumentParser, score_default: float | None, score_help: str
) -> None:
    """The paper's test-time options (§4.3); unset ones keep the checkpoint config's values."""
    g = parser.add_argument_group("test-time options (default: the checkpoint's config)")
    g.add_argument(
        "--min-size",
        type=int,
        metavar="PX",
        help="shorter side the image is resized to (paper: 800)",
    )
    g.add_argument(
        "--max-size",
        type=int,
        metavar="PX",
        help="cap on the longer side (paper: 1333; with --min-size alone: min-size x 1333/800)",
    )
    g.add_argument(
        "--score-thresh", type=float, default=score_default, metavar="S", help=score_help
    )
    g.add_argument("--topk", type=int, metavar="K", help="candidates kept before NMS (6000)")
    g.add_argument("--nms-thresh", type=float, metavar="IOU", help="NMS IoU threshold (0.5)")
    g.add_argument("--max-detections", type=int, metavar="N", help="detections per image (100)")


def add_execution_arguments(parser: argparse.ArgumentParser, default_actors: int) -> None:
    g = parser.add_argument_group("execution")
    g.add_argument(
        "--num-actors",
        type=int,
        default=default_actors,
        metavar="N",
        help=f"Ray Data actors, one model each (default {default_actors}; 0: in this process, "
        "no Ray)",
    )
    g.add_argument(
        "--batch-size", type=int, default=4, metavar="N", help="images per actor call (default 4)"
    )
    g.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per actor, also its torch threads (default 1)",
    )
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: one GPU per actor (default cpu)",
    )
    add_address_argument(g)
    g.add_argument(
        "--strict", action="store_true", help="stop at the first image that cannot be decoded"
    )


@dataclass(frozen=True)
class InferenceOptions:
    """The paper's test-time settings (§4.3); None keeps the checkpoint config's value. Names as
    torchvision's detection models and Detectron2 call them."""

    min_size: int | None = None  # shorter side the image is resized to (paper: 800)
    max_size: int | None = None  # cap on the longer side (paper: 1333)
    score_thresh: float | None = None  # detections kept scoring at least this (paper: 0.05)
    topk_candidates: int | None = None  # candidates kept before NMS (6000)
    nms_thresh: float | None = None  # NMS IoU threshold (0.5)
    detections_per_image: int | None = None  # detections kept per image (100)

    def overrides(self) -> dict[str, Any]:
        """The settings given, checked, as dotted config overrides; --min-size alone keeps the
        paper's 800:1333 ratio for the cap."""
        checks = {
            "min_size": ("input.min_size_test", lambda v: v >= 1, "a positive number of pixels"),
            "max_size": ("input.max_size_test", lambda v: v >= 1, "a positive number of pixels"),
            "score_thresh": ("inference.score_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
            "topk_candidates": ("inference.topk_candidates", lambda v: v >= 1, "at least 1"),
            "nms_thresh": ("inference.nms_thresh", lambda v: 0 < v <= 1, "in (0, 1]"),
            "detections_per_image": (
                "inference.detections_per_image",
                lambda v: v >= 1,
                "at least 1",
            ),
        }
        overrides = {}
        for name, (key, ok, what) in checks.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not ok(value):
                raise UserError(
                    f"--{_FLAGS.get(name, name).replace('_', '-')} {value}: must be {what}"
                )
            overrides[key] = value
        if "input.min_size_test" in overrides and "input.max_size_test" not in overrides:
            overrides["input.max_size_test"] = round(overrides["input.min_size_test"] * 1333 / 800)
        return overrides


# InferenceOptions field -> the command-line flag that sets it, for the error messages
_FLAGS = {"topk_candidates": "topk", "detections_per_image": "max_detections"}


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The test-time options of a parsed command line."""
    return InferenceOptions(
        args.min_size, args.max_size, args.score_thresh, args.topk, args.nms_thresh,
        args.max_detections,
    )  # fmt: skip


@dataclass(frozen=True)
class Execution:
    """How inference is spread: Ray Data actors, one model each (0: in this process, no Ray)."""

    num_actors: int = 1
    batch_size: int = 4  # images per actor call
    cpus_per_actor: float = 1.0  # also the actor's torch threads
    device: str = "cpu"  # cuda: one GPU per actor
    address: str | None = None  # Ray cluster to join (default: RAY_ADDRESS or local)
    strict: bool = False  # stop at the first image that cannot be decoded

    @property
    def local(self) -> bool:
        return self.num_actors == 0

    @property
    def gpus_per_actor(self) -> float:
        return 1.0 if self.device == "cuda" else 0.0

    def check(self) -> None:
        if self.num_actors < 0:
            raise UserError(f"--num-actors {self.num_actors}: must be 0 (in this process) or more")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.cpus_per_actor <= 0:
            raise UserError(f"--cpus-per-actor {self.cpus_per_actor}: must be positive")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r}: must be cpu or cuda")
        if self.device == "cuda" and self.local:
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: this machine has no CUDA device")


def execution(args: argparse.Namespace) -> Execution:
    """The execution options of a parsed command line."""
    return Execution(
        args.num_actors, args.batch_size, args.cpus_per_actor, args.device, args.address,
        args.strict,
    )  # fmt: skip


class Progress:
    """A progress line every `every` seconds and at the end: done/total, images/s, failures."""

    def __init__(self, command: str, total: int, already: int, every: float = 10.0):
        self.command, self.total, self.already, self.every = command, total, already, every
        self.count = self.failed = 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, record: dict) -> None:
        self.count += 1
        self.failed += bool(record["error"])
        now = time.perf_counter()
        if self.count == 1:
            self.first = now  # start-up (Ray, actors, model loading) ends here
        if now - self.last >= self.every or self.already + self.count == self.total:
            self.last = now
            parts = [f"{now - self.t0:.0f} s"]
            if now - self.first >= 1.0:  # images arrive in batches: no rate from one batch
                parts.append(f"{(self.count - 1) / (now - self.first):.2f} images/s")
            if self.failed:
                parts.append(f"{self.failed} could not be decoded")
            print(
                f"[{self.command}] {self.already + self.count}/{self.total} images "
                f"({', '.join(parts)})",
                file=sys.stderr,
                flush=True,
            )


def load_model(ref, overrides: dict[str, Any], execution: Execution):
    """The model of a resolved checkpoint (a CheckpointRef), loaded once here so that a
    checkpoint not matching its config fails before any inference: (model, Config, categories).
    On the execution's device for in-process inference (no actors), else on the CPU (the actors
    load their own copy)."""
    from ..train.checkpoint import load_model_for_inference

    return load_model_for_inference(
        ref.path, overrides, execution.device if execution.local else "cpu"
    )


def report_failures(command: str, failures: dict[int, tuple[str, str]], limit: int = 20) -> None:
    """Names the images that could not be decoded (skipped), on stderr."""
    if not failures:
        return
    print(
        f"[{command}] skipped {len(failures)} images that could not be read or decoded:",
        file=sys.stderr,
    )
    for image_id, (name, error) in sorted(failures.items())[:limit]:
        print(f"  {name} (image {image_id}): {error}", file=sys.stderr)
    if len(failures) > limit:
        print(f"  ... and {len(failures) - limit} more", file=sys.stderr)
