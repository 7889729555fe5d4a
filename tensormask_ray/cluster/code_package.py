"""`--ship-code`: the local package, compiled extension included, zipped for upload.

For development against a cluster whose Python/torch match this machine (a local head, or a
cluster started from an image of this checkout): the zip is uploaded to the cluster's package
store and added as a `py_modules` entry, which Ray puts first on every worker's `PYTHONPATH`,
ahead of the installed copy.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path


def package_zip(out_dir: Path) -> tuple[Path, dict[str, str]]:
    """Zips the local tensormask_ray package (sources, package data, compiled extension) as
    `tensormask_ray/...`, byte-identical for identical files so Ray's content-addressed upload
    is skipped when nothing changed. Returns (zip path, metadata about the build it carries)."""
    import tensormask_ray

    pkg = Path(tensormask_ray.__file__).resolve().parent
    files = sorted(
        p
        for p in pkg.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix in (".py", ".yaml", ".yml", ".json", ".so")
    )
    compiled = [p.name for p in files if p.suffix == ".so"]
    path = out_dir / "tensormask_ray.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(
                f"tensormask_ray/{p.relative_to(pkg).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0)
            )
            info.external_attr = (0o755 if p.suffix == ".so" else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, p.read_bytes())
    meta = {
        "tensormask_ray_shipped_from": "local checkout",
        "tensormask_ray_shipped_extension": ",".join(compiled) or "none",
        "tensormask_ray_shipped_python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    return path, meta


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tensormask-submit-")


__all__ = ["package_zip", "temp_dir"]
