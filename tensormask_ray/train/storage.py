"""Small read/write helpers for run storage that may be a local folder or an object-store /
shared-filesystem URI (through pyarrow.fs), so the same code serves a laptop and a cluster."""

from __future__ import annotations

import json
import os
from typing import Any


def absolute(path: str) -> str:
    """Local paths become absolute (workers do not run in the caller's directory); URIs stay."""
    return path if "://" in path else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _fs_and_path(uri: str):
    import pyarrow.fs

    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs_and_path(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(uri: str) -> str | None:
    if not exists(uri):
        return None
    fs, path = _fs_and_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Written to a temporary name, then moved, so readers never see half a file."""
    fs, path = _fs_and_path(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def read_json(uri: str) -> Any:
    text = read_text(uri)
    return None if text is None else json.loads(text)


def write_json(uri: str, value: Any) -> None:
    write_text(uri, json.dumps(value, indent=1))


def copy_to_local(uri: str, local_path) -> None:
    """One file of run storage (a local path or a URI) copied to a local path."""
    import pyarrow.fs

    fs, path = _fs_and_path(uri)
    pyarrow.fs.copy_files(
        path,
        str(local_path),
        source_filesystem=fs,
        destination_filesystem=pyarrow.fs.LocalFileSystem(),
    )
