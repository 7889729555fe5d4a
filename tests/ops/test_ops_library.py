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
        monkeypatch.setattr(
            reference, name, lambda *a, _n=name, **k: pytest.fail(f"api ran reference.{_n}")
        )
    assert torch.equal(api.align2nat(x, 2, -1.0), expected["align2nat"])
    assert torch.equal(api.nat2align(x, 1, -6.0), expected["nat2align"])
    assert torch.equal(api.up_align2nat(x, (9, 7), "nearest", -2.0), expected["up_align2nat"])
    assert torch.equal(api.swap_align2nat(x, 3, -6.0), expected["swap_align2nat"])
    assert torch.equal(
        api.swap_align2nat(x, 3, -6.0, geometry="detectron2"), expected["swap_align2nat_detectron2"]
    )


@requires_ext
def test_ensure_loaded_registers_once_even_from_many_threads(monkeypatch):
    """Registering a fake or autograd implementation twice is an error in torch.library: the
    first load registers, every later or concurrent call does nothing."""
    import threading
    import time

    calls = []

    def register_autograd():
        time.sleep(0.01)  # widen the window in which a second thread could slip in
        calls.append("autograd")

    monkeypatch.setattr(library, "_LOADED", False)  # as in a fresh process (restored after)
    monkeypatch.setattr(library, "_register_fakes", lambda: calls.append("fakes"))
    monkeypatch.setattr(library, "_register_autograd", register_autograd)
    threads = [threading.Thread(target=library.ensure_loaded) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    library.ensure_loaded()
    assert calls == ["fakes", "autograd"] and library._LOADED


@requires_ext
def test_build_info_reports_every_op(capsys):
    assert build_info.main() == 0
    printed = capsys.readouterr().out
    for name in library.OPS + library.BACKWARD_OPS:
        assert name in printed
    assert "CUDA kernels registered" in printed


def test_a_missing_extension_fails_in_ci_and_skips_elsewhere():
    from .conftest import extension_check

    extension_check(None, in_ci=True)  # built: the test runs
    with pytest.raises(pytest.fail.Exception, match="CI=true and the extension is not built"):
        extension_check("no module named tensormask_ray._C", in_ci=True)
    with pytest.raises(pytest.skip.Exception, match="extension not built: no module"):
        extension_check("no module named tensormask_ray._C", in_ci=False)
