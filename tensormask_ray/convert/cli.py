"""`tensormask-ray convert detectron2 MODEL.pkl|.pth [key=value ...] --out DIR [--preset NAME]`:
argument parsing and printing only (the work is in detectron2.py)."""

from __future__ import annotations

import argparse

from ..config import preset_names
from .detectron2 import DEFAULT_PRESET

D2_PRESETS = [name for name in preset_names() if name.startswith("d2-")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="SOURCE", required=True)
    p = sub.add_parser(
        "detectron2",
        help="a Detectron2 TensorMask checkpoint (model zoo .pkl or trainer .pth)",
        description="Converts a Detectron2 TensorMask checkpoint into a checkpoint folder of this "
        "project (state.pt with the weights, the config and COCO's categories; config.yaml; SOURCE) "
        "that evaluate, predict and train (model.weights=DIR) take. The .pkl is read with an "
        "unpickler that admits numpy arrays and plain containers only. Every key must map: a missing, "
        "extra or mis-shaped one is an error that lists them all. See docs/detectron2.md.",
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="model_final_*.pkl from Detectron2's model zoo, or a .pth",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"config of the model ({', '.join(D2_PRESETS)}; default {DEFAULT_PRESET}); the schedule "
        "part only matters for fine-tuning",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides on the preset"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in DIR")


def run(args: argparse.Namespace) -> int:
    from ..modeling.checkpoint_file import STATE_FILE
    from .detectron2 import convert_detectron2

    out = convert_detectron2(
        args.checkpoint, args.out, args.preset, list(args.overrides), args.overwrite
    )
    print(f"[convert] wrote {out / STATE_FILE} (preset {args.preset}, 80 COCO categories)")
    print(
        f"[convert] evaluate it: tensormask-ray evaluate --checkpoint {out} --shards SHARDS --out EVAL_DIR"
    )
    return 0
