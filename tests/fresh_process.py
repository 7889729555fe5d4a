"""Running test code in a fresh Python process: for what one process cannot show twice, such as
which modules an import loads."""

from __future__ import annotations

import subprocess
import sys


def not_loaded(*modules: str) -> str:
    """Python lines asserting that none of `modules` is in sys.modules at that point."""
    return (
        "import sys as _sys\n"
        f"_loaded = [m for m in {modules!r} if m in _sys.modules]\n"
        "assert not _loaded, f'loaded: {_loaded}'\n"
    )


def run_python(code: str) -> None:
    """Runs `code` with this interpreter in a new process; fails with its stderr if it fails."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
