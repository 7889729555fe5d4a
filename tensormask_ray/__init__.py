"""tensormask-ray: TensorMask (Chen et al., ICCV 2019) with Ray Train/Data/Tune, MLflow, COCO eval.

The Python API (`tensormask_ray.api`) is re-exported here: `tensormask_ray.evaluate(...)`,
`tensormask_ray.train(...)`. It imports Ray, torch and MLflow only when a function runs, so
`import tensormask_ray` stays light.
"""

__version__ = "0.1.0"

from . import api as api
from .api import *  # noqa: F403 - the API's names, listed once: api.__all__
from .api import __all__ as __all__
