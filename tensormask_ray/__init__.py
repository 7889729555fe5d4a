"""tensormask-ray: TensorMask (Chen et al., ICCV 2019) with Ray Train/Data/Tune, MLflow, COCO eval."""

__version__ = "0.1.0"
