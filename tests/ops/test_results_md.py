"""benchmarks/results_md.py: the RESULTS.md writer and the load check every benchmark uses."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "results_md.py"
_spec = importlib.util.spec_from_file_location("results_md", _PATH)
results_md = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("results_md", results_md)  # dataclasses look their module up there
_spec.loader.exec_module(results_md)

OLD = """# Benchmark results

## Ops

intro

<!-- ops:cpu -->
old cpu figures
<!-- /ops:cpu -->

## Data

old data
"""


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(OLD)
    results_md.write_section("Data", "new data", path=path)
    results_md.write_section("Model", "model figures", path=path)
    text = path.read_text()
    assert "old data" not in text and "new data" in text
    assert "old cpu figures" in text and "intro" in text
    assert text.index("## Ops") < text.index("## Data") < text.index("## Model")


def test_write_section_block_replaces_one_device(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(OLD)
    results_md.write_section("Ops", "### CUDA\ncuda figures", block="ops:cuda", path=path)
    results_md.write_section("Ops", "### CPU\nnew cpu figures", block="ops:cpu", path=path)
    text = path.read_text()
    assert "old cpu figures" not in text
    assert text.count("<!-- ops:cpu -->") == 1 and text.count("<!-- ops:cuda -->") == 1
    ops = text[text.index("## Ops") : text.index("## Data")]
    assert "intro" in ops and "new cpu figures" in ops and "cuda figures" in ops
    assert "old data" in text


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    results_md.add_write_args(parser, "Ops")
    return parser.parse_args(list(argv))


def test_refuses_to_write_under_load_unless_forced(monkeypatch):
    monkeypatch.setattr(results_md, "load_average", lambda: (3.5, 2.0, 1.0))
    with pytest.raises(SystemExit, match=r"load average is 3\.50 > 1\.0"):
        results_md.BenchmarkRun.start(_args("--write"), ["benchmarks/ops.py", "--write"])
    # Without --write it measures (and says so); with --force it writes, marked.
    quiet = results_md.BenchmarkRun.start(_args(), ["benchmarks/ops.py"])
    assert quiet.under_load and not quiet.writing
    forced = results_md.BenchmarkRun.start(
        _args("--write", "--force"), ["benchmarks/ops.py", "--write", "--force"]
    )
    header = forced.header(threads=2)
    assert header[0].startswith("- **Measured under load**") and "3.50" in header[0]
    assert "--force" in header[0]
    assert any("`python benchmarks/ops.py --write --force`" in line for line in header)
    assert any("3.50/2.00/1.00 at start" in line for line in header)


def test_quiet_machine_writes_unmarked(monkeypatch):
    monkeypatch.setattr(results_md, "load_average", lambda: (0.4, 0.5, 0.6))
    run = results_md.BenchmarkRun.start(_args("--write"), ["benchmarks/ops.py", "--write"])
    assert not run.under_load
    assert not any("under load" in line for line in run.header())


def test_an_untimed_run_writes_at_any_load_unmarked(monkeypatch):
    monkeypatch.setattr(results_md, "load_average", lambda: (3.5, 2.0, 1.0))
    run = results_md.BenchmarkRun.start(
        _args("--write"), ["benchmarks/flops.py", "--write"], timed=False
    )
    assert run.writing and not run.under_load
    header = run.header()
    assert not any("under load" in line or "Load average" in line for line in header)


def test_publish_prints_and_writes_only_with_write(monkeypatch, capsys):
    monkeypatch.setattr(results_md, "load_average", lambda: (0.4, 0.5, 0.6))
    written = []
    monkeypatch.setattr(results_md, "write_section", lambda *a, **k: written.append(a))
    results_md.BenchmarkRun.start(_args(), ["benchmarks/ops.py"]).publish("Ops", "figures")
    assert written == [] and capsys.readouterr().out == "figures\n"
    run = results_md.BenchmarkRun.start(_args("--write"), ["benchmarks/ops.py", "--write"])
    run.publish("Ops", "figures")
    assert written == [("Ops", "figures")]
    assert capsys.readouterr().out.startswith("figures\n")


def test_time_interleaved_takes_turns():
    calls = []
    t = results_md.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b"] * 4
    assert set(t) == {"a", "b"} and len(t["a"].samples) == 3
    assert t["a"].min <= t["a"].median
    with pytest.raises(ValueError, match="repeats"):
        results_md.time_interleaved({"a": lambda: None}, repeats=0)
