"""Checkpoints of other codebases -> checkpoints of this project (`tensormask-ray convert`)."""
