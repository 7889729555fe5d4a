"""Loading the extension, choosing the backend, and the build report."""

from __future__ import annotations

import sys

import pytest
import torch

from tensormask_ray.ops import api, build_info, library, reference

from ._cases import rand, requires_ext


def test_missing_extension_raises_an_actionable_error(monkeypatch):
    monkeypatch.setattr(library, "_LOADED", False)
    monkeypatch.setitem(sys.modules, "tensormask_ray._C", None)  # makes the import fail
    with pytest.raises(ImportError, match="make install") as info:
        library.ensure_loaded()
    assert "TENSORMASK_OPS=reference" in str(info.value)
    # The public ops report the same error instead of silently using the references.
    monkeypatch.delenv(api.BACKEND_ENV, raising=False)
    with pytest.raises(ImportError, match="could not be loaded"):
        api.swap_align2nat(rand((1, 3, 3, 4, 4)), 2, -6.0)


def test_reference_backend_is_an_explicit_opt_in(monkeypatch):
    x = rand((1, 3, 3, 5, 4))
    monkeypatch.setenv(api.BACKEND_ENV, "reference")
    assert api.backend() == "reference"
    monkeypatch.setattr(
        library, "ensure_loaded", lambda: pytest.fail("must not load the extension")
    )
    out = api.swap_align2nat(x, 2, -1.0)
    assert out.shape == (1, 6, 6, 3, 2)
    out = api.swap_align2nat(x, 2, -1.0, geometry="detectron2")
    assert torch.equal(out, reference.swap_align2nat_detectron2(x, 2, -1.0))
    monkeypatch.setenv(api.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="TENSORMASK_OPS"):
        api.align2nat(x, 1, -6.0)


@requires_ext
def test_public_api_uses_the_fused_ops(monkeypatch):
    monkeypatch.delenv(api.BACKEND_ENV, raising=False)
    assert api.backend() == "fused"
    x = rand((2, 5, 3, 6, 7))
    ops = torch.ops.tensormask
    expected = {
        "align2nat": ops.align2nat(x, 2, -1.0),
        "nat2align": ops.nat2align(x, 1, -6.0),
        "up_align2nat": ops.up_align2nat(x, 9, 7, "nearest", -2.0),
        "swap_align2nat": ops.swap_align2nat(x, 3, -6.0),
        "swap_align2nat_detectron2": ops.swap_align2nat_detectron2(x, 3, -6.0),
    }
    # The references give the same numbers, so equal outputs alone would not show which ran:
    # with every reference made to fail, the public API must still answer.
    for name in expected:
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"api ran reference.{_n}"))
    assert torch.equal(api.align2nat(x, 2, -1.0), expected["align2nat"])
    assert torch.equal(api.nat2align(x, 1, -6.0), expected["nat2align"])
    assert torch.equal(api.up_align2nat(x, (9, 7), "nearest", -2.0), expected["up_align2nat"])
    assert torch.equal(api.swap_align2nat(x, 3, -6.0), expected["swap_align2nat"])
    assert torch.equal(
        api.swap_align2nat(x, 3, -6.0, geometry="detectron2"), expected["swap_align2nat_detectron2"]
    )


@requires_ext
def test_ensure_loaded_is_idempotent():
    library.ensure_loaded()
    library.ensure_loaded()


@requires_ext
def test_build_info_reports_every_op(capsys):
    assert build_info.main() == 0
    printed = capsys.readouterr().out
    for name in library.OPS + library.BACKWARD_OPS:
        assert name in printed
    assert "CUDA kernels registered" in printed
