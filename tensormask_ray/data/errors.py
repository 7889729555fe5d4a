"""The error of the data commands: a bad record, file or folder, named in the message."""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """Bad input data (a COCO record, an image file, a shards folder). `data prepare --strict`
    raises it at the first bad record; the CLI prints the message and exits 2."""
