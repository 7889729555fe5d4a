"""What every benchmark script shares: the load check, the machine line, the interleaved-median
timer, and the writer of benchmarks/RESULTS.md.

A timing figure taken on a loaded machine says little, so a benchmark that writes RESULTS.md
records the 1-minute load average before and after, and refuses to write when the load average at
its start exceeds LOAD_LIMIT unless forced (--force); a forced section then says, first thing,
that it was measured under load and how much. In a script:

    parser = argparse.ArgumentParser(...)
    add_write_args(parser, "Model")                 # --write, --force
    args = parser.parse_args()
    run = BenchmarkRun.start(args)                  # load at start; exits now if it may not write
    times = time_interleaved({"a": fa, "b": fb}, repeats=5)   # medians, peers in one process
    ...
    text = "\n".join([*run.header(), "", *table])  # command, machine, load before/after, versions
    run.publish("Model", text)                      # prints it; with --write, writes the section

RESULTS.md holds one `## Heading` section per benchmark; each script replaces its own (from the
heading to the next `## `) and leaves the others as they are.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]
# The 1-minute load average above which a benchmark refuses to write RESULTS.md unless forced.
LOAD_LIMIT = 1.0


# ---- the machine -----------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (nan where the OS has none)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return (math.nan, math.nan, math.nan)


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(threads: int | None = None, device: str = "cpu") -> str:
    """`CPU model, C cores[, T torch threads][; GPU]`: where the figures were measured."""
    line = f"{cpu_model()}, {os.cpu_count()} cores"
    if threads is not None:
        line += f", {threads} torch thread{'s' if threads != 1 else ''}"
    if device == "cuda":
        import torch

        line += f"; {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return line


# ---- timing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one function: the median and the minimum of its repeats."""

    median: float
    min: float
    samples: tuple[float, ...]


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Times each fn `repeats` times, the fns taking turns within every repeat (after `warmup`
    untimed rounds), so that a change of load on the machine falls on all of them alike; ratios
    between them (a kernel and its peer, e.g. a clone of as many bytes) are then meaningful even
    on a shared machine. `sync` (e.g. torch.cuda.synchronize) runs before and after each call."""
    if repeats < 1:
        raise ValueError(f"time_interleaved: repeats must be >= 1, got {repeats}")

    def once(fn) -> float:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for fn in fns.values():
            once(fn)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(once(fn))
    return {name: Timing(statistics.median(s), min(s), tuple(s)) for name, s in samples.items()}


# ---- a benchmark run -------------------------------------------------------------------------


def add_write_args(parser: argparse.ArgumentParser, section: str) -> None:
    """--write (replace the `## {section}` section of RESULTS.md) and --force."""
    parser.add_argument(
        "--write", action="store_true", help=f"update the {section} section of RESULTS.md"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"with --write: write even if the 1-minute load average at start exceeds "
        f"{LOAD_LIMIT:g} (the figures are then marked as measured under load)",
    )


@dataclass
class BenchmarkRun:
    """One run of a benchmark script: its command, start time and the load average at start
    (`start`), and at the end (`header`)."""

    command: str
    writing: bool  # --write
    force: bool
    load_start: tuple[float, float, float]
    timed: bool = True  # False: counts that no load can change (FLOPs); no load gate, no mark
    started: float = field(default_factory=time.perf_counter)
    when: str = field(default_factory=lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))

    @classmethod
    def start(
        cls, args: argparse.Namespace, argv: list[str] | None = None, timed: bool = True
    ) -> BenchmarkRun:
        """Records the command and the load; when args.write is set, the load average exceeds
        LOAD_LIMIT and args.force is not set, exits (status 1, saying why) before measuring anything.
        timed=False is for figures the machine's load cannot change (operation counts): they
        write at any load, unmarked."""
        argv = sys.argv if argv is None else argv
        script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
        run = cls(
            command=shlex.join(["python", script, *argv[1:]]),
            writing=bool(getattr(args, "write", False)),
            force=bool(getattr(args, "force", False)),
            load_start=load_average(),
            timed=timed,
        )
        if run.writing and run.under_load and not run.force:
            sys.exit(
                f"{script}: the 1-minute load average is {run.load_start[0]:.2f} > {LOAD_LIMIT:.1f}: "
                "not measuring for RESULTS.md on a loaded machine. Run it when the machine is "
                "quiet, without --write to only print figures, or with --force to write them "
                "marked as measured under load."
            )
        return run

    @property
    def under_load(self) -> bool:
        """Whether the 1-minute load average at start exceeded LOAD_LIMIT (for a timed run)."""
        return self.timed and self.load_start[0] > LOAD_LIMIT

    def header(
        self, threads: int | None = None, device: str = "cpu", versions: str = ""
    ) -> list[str]:
        """Markdown bullets: the under-load mark (when it applies), the command and its duration,
        the machine, the load averages at start and now, the versions and the date."""
        import torch

        lines = []
        if self.under_load:
            forced = "; written with --force" if self.writing else ""
            lines.append(
                f"- **Measured under load**: 1-minute load average {self.load_start[0]:.2f} at "
                f"start (> {LOAD_LIMIT:.1f}{forced}): the figures are indicative only."
            )
        lines += [
            f"- Command: `{self.command}` ({time.perf_counter() - self.started:.0f} s)",
            f"- Machine: {machine(threads, device)}",
        ]
        if self.timed:
            lines.append(
                f"- Load average (1/5/15 min): {fmt_load(self.load_start)} at start, "
                f"{fmt_load(load_average())} at the end"
            )
        lines.append(
            f"- torch {torch.__version__}{', ' + versions if versions else ''}, "
            f"Python {platform.python_version()}, {self.when}"
        )
        return lines

    def publish(self, heading: str, text: str) -> None:
        """Prints `text`; with --write, also makes it the `## {heading}` section of RESULTS.md."""
        print(text)
        if self.writing:
            self.write(heading, text)

    def write(
        self, heading: str, body: str, block: str | None = None, path: Path = RESULTS
    ) -> None:
        """write_section, for a run that may write (start() has checked the load)."""
        if not self.writing:
            raise RuntimeError("BenchmarkRun.write: the run was started without --write")
        write_section(heading, body, block=block, path=path)
        print(f"wrote the {heading} section of {os.path.relpath(path, ROOT)}")


# ---- RESULTS.md ------------------------------------------------------------------------------


def write_section(heading: str, body: str, block: str | None = None, path: Path = RESULTS) -> None:
    """Replaces the section `## {heading}` of `path` with `body`, or appends it. With `block`,
    only the part of the section between `<!-- {block} -->` and `<!-- /{block} -->` is replaced
    (or appended to the section), so that one section can hold e.g. a CPU and a CUDA block."""
    title = f"## {heading}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").splitlines()
    body_lines = body.strip("\n").splitlines()
    if title in lines:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
    else:
        lines += ["", title, ""]
        start, end = len(lines) - 2, len(lines)
    if block is None:
        lines[start:end] = [title, "", *body_lines, ""]
    else:
        section = lines[start:end]
        begin_mark, end_mark = f"<!-- {block} -->", f"<!-- /{block} -->"
        new_block = [begin_mark, *body_lines, end_mark]
        if begin_mark in section and end_mark in section:
            b, e = section.index(begin_mark), section.index(end_mark)
            section[b : e + 1] = new_block
        else:
            while section and section[-1] == "":
                section.pop()
            section += ["", *new_block]
        lines[start:end] = [*section, ""]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
