"""The `built_extension` fixture behind `requires_ext` (see _cases.py)."""

from __future__ import annotations

import pytest

from . import _cases


def extension_check(load_error: str | None, in_ci: bool) -> None:
    """Nothing when the extension loaded; else a skip, or in CI a failure, naming why."""
    if load_error is None:
        return
    if in_ci:
        pytest.fail(
            f"CI=true and the extension is not built ({load_error}): `make install` failed?"
        )
    pytest.skip(f"extension not built: {load_error}")


@pytest.fixture
def built_extension() -> None:
    extension_check(_cases.LOAD_ERROR, _cases.IN_CI)
