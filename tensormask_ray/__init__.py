"""tensormask-ray: TensorMask (Chen et al., ICCV 2019) with Ray Train/Data/Tune, MLflow, COCO eval.

The Python API (`tensormask_ray.api`) is re-exported here and imported on first use, so that
`import tensormask_ray` stays light: `tensormask_ray.evaluate(...)`, `tensormask_ray.train(...)`.
"""

__version__ = "0.1.0"

_API = (
    "BestTrial",
    "CompareResult",
    "RegisterResult",
    "SweepResult",
    "TrainResult",
    "best_trial",
    "compare",
    "evaluate",
    "make_imgviz",
    "make_synthetic",
    "merge",
    "predict",
    "prepare",
    "register",
    "sweep",
    "train",
)


def __getattr__(name: str):
    if name in _API or name == "api":
        import importlib

        api = importlib.import_module(".api", __name__)
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "api"])
