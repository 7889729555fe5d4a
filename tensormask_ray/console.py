"""What the terminal shows: our own progress lines and summaries. Ray's, Ray Data's and other
libraries' logs go to a log file instead, whose path is printed when Ray starts; `--verbose` (or
`TENSORMASK_VERBOSE=1`) shows them on the terminal again (the file still gets everything).

How, with public mechanisms only: while a command runs, `sys.stdout` and `sys.stderr` are
`LineRouter`s. Ray prints what its workers write (`ray.init(log_to_driver=True)`) on the driver
with a `(Name pid=N)` prefix, logs from the driver's `ray` loggers as `<date> <LEVEL> file:line --`,
and libraries warn through `warnings`/`logging`: each write is classified by its first line.
Lines from workers reach the terminal only when they carry one of our tags (`[train] ...`, printed by
rank 0 and by our Ray Train and Tune callbacks); a few Ray messages that matter to the user (a worker
died, a task was killed for memory) are printed in our words; the rest goes to the file only.
What our own code prints on the driver passes through unchanged.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "TENSORMASK_VERBOSE"
LOG_DIR_ENV = "TENSORMASK_LOG_DIR"
# What our code prints from Ray processes (rank 0 of the training, our callbacks) starts with one
# of these; from the driver, anything not recognised as a library's log passes.
TAGS = ("[train]", "[sweep]", "[evaluate]", "[predict]", "[data]", "[demo]", "[warning]")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "(RayTrainWorker pid=123)", "(pid=123, ip=10.0.0.2)", "(raylet)", "(autoscaler +1m2s)"
_FORWARDED = re.compile(
    r"^\((?:(?:[^()]* )?pid=[^()]*|raylet[^()]*|autoscaler[^()]*|gcs_server[^()]*)\) ?(?P<rest>.*)$",
    re.S,
)
_ERROR = re.compile(r"^tensormask-ray [\w-]+: error: ")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")
_LIBRARY_LOG = (
    re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
    ),  # ray
    re.compile(
        r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+:"
    ),  # mlflow
    re.compile(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+:\d+"
    ),  # Ray's C++ core
    re.compile(r"^(?:/|[A-Za-z]:\\)\S+\.py:\d+: \w*(?:Warning|Deprecated)\w*: "),  # warnings.warn
)
# Ray messages that matter to the user, in our words ({log} is the log file).
_TRANSLATIONS = (
    (
        re.compile(
            r"A worker died or was killed while executing|worker .* died unexpectedly|SYSTEM_ERROR",
            re.I,
        ),
        "[ray] warning: a Ray worker process died unexpectedly; Ray Train and Tune restart what they can "
        "(train.max_failures, a sweep's max_failures). Details: {log}",
    ),
    (
        re.compile(
            r"killed due to (?:the node running )?low (?:on )?memory|OutOfMemoryError|memory monitor",
            re.I,
        ),
        "[ray] warning: Ray killed a worker because this machine is low on memory (fewer workers, smaller "
        "batches or images help). Details: {log}",
    ),
)


def is_verbose(flag: bool = False) -> bool:
    """--verbose, or TENSORMASK_VERBOSE set to something other than 0/false/no/empty."""
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class LogFile:
    """The command's log file, created on the first write (a command that starts no Ray and
    prints nothing of a library's leaves none behind); `on_open()` runs once it exists."""

    def __init__(self, path: Path, on_open: Callable[[], None] | None = None):
        self.path = path
        self.on_open = on_open
        self._file: TextIO | None = None

    def write(self, text: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
            if self.on_open is not None:
                self.on_open()
        self._file.write(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LineRouter(io.TextIOBase):
    """A text stream standing in for sys.stdout or sys.stderr: what is written is buffered to
    whole lines, classified by the first line of each write (a log record or a warning is one
    write, however many lines), and sent to the terminal and/or the log file."""

    def __init__(
        self, terminal: TextIO, log: LogFile, verbose: bool, hidden: set[str] | None = None
    ):
        super().__init__()
        self.terminal, self.log, self.verbose = terminal, log, verbose
        self.hidden = hidden if hidden is not None else set()  # tags not shown from workers now
        self.muted = False  # everything to the log file only (see `log_only`)
        self._pending = ""
        self._noted: set[str] = set()  # translated messages are printed once each

    # io.TextIOBase
    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.terminal, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    def write(self, text: str) -> int:
        self._pending += text
        if self._pending.endswith("\n"):
            chunk, self._pending = self._pending, ""
            self._route(chunk)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            chunk, self._pending = self._pending, ""
            self._route(chunk)
        self._show("")

    def _show(self, text: str) -> None:
        """To the terminal; a terminal closed under a handler that outlived it (a test's captured
        stream under Ray's loggers) drops the text, which the log file already holds."""
        if self.terminal.closed:
            return
        if text:
            self.terminal.write(text)
        self.terminal.flush()

    def _route(self, chunk: str) -> None:
        self.log.write(chunk if chunk.endswith("\n") else chunk + "\n")
        if self.verbose:
            self._show(chunk)
            return
        if self.muted:  # a failing command's error line still shows
            chunk = "".join(line for line in chunk.splitlines(keepends=True) if _ERROR.match(line))
        lines = chunk.splitlines()
        first = _ANSI.sub("", lines[0]) if lines else ""
        if any(p.match(first) for p in _LIBRARY_LOG):  # a log record or a warning: all its lines
            shown = [self._translate(_ANSI.sub("", chunk))]
        else:  # Ray prints forwarded worker output one line at a time, each with its prefix
            shown = [self.classify(line) for line in lines]
        shown = [line for line in shown if line is not None]
        if shown:
            self._show("\n".join(shown) + "\n")

    def classify(self, line: str) -> str | None:
        """One line as the terminal should show it, or None for the log file only."""
        plain = _ANSI.sub("", line)
        forwarded = _FORWARDED.match(plain)
        if forwarded:
            rest = _REPEATED.sub("", forwarded["rest"])
            if rest.startswith(TAGS):
                return None if rest.startswith(tuple(self.hidden)) else rest
            return self._translate(rest)
        if any(p.match(plain) for p in _LIBRARY_LOG):
            return self._translate(plain)
        return line

    def _translate(self, text: str) -> str | None:
        for pattern, words in _TRANSLATIONS:
            if pattern.search(text) and words not in self._noted:
                self._noted.add(words)
                return words.format(log=self.log.path)
        return None


class Console:
    """The routing installed for one command (see `routed`)."""

    def __init__(self, log_path: Path, verbose: bool, terminal: TextIO):
        self.log = LogFile(log_path, on_open=self.announce)
        self.verbose = verbose
        # the real stderr: notices, so stdout stays the command's output (JSON)
        self.terminal = terminal
        self.announced = False
        self.started_ray = False  # this command started Ray: it stops it before the routers go
        self.hidden: set[str] = set()  # shared by both routers
        self._native: tuple[LineRouter, TextIO] | None = None  # (stderr router, its old terminal)

    def capture_native_stderr(self) -> None:
        """File descriptor 2 into the log file, from now until the command ends, while Python's
        sys.stderr keeps writing to the terminal through a copy of it: what native code writes
        there (Ray's C++ core worker in this process logs its warnings to fd 2, past the routers)
        is kept in the log and off the terminal. Not when verbose, nor when sys.stderr is not fd 2
        (a caller that captures stderr itself, as pytest does)."""
        router = sys.stderr
        if self.verbose or self._native is not None or not isinstance(router, LineRouter):
            return
        try:
            if router.terminal.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            return
        router.flush()
        self.log.write("")  # the log file exists (and is announced) before fd 2 points at it
        old = router.terminal
        old.flush()
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=old.encoding, errors=old.errors)
        log_fd = os.open(self.log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        router.terminal = self.terminal = terminal
        self._native = (router, old)

    def release_native_stderr(self) -> None:
        """fd 2 back to the terminal (undoes `capture_native_stderr`)."""
        if self._native is None:
            return
        router, old = self._native
        self._native = None
        router.flush()
        terminal = router.terminal
        terminal.flush()
        os.dup2(terminal.fileno(), 2)
        terminal.close()
        router.terminal = self.terminal = old

    def announce(self) -> None:
        """Says, once, where the logs go: when the log file is first written, or earlier."""
        if self.announced:
            return
        self.announced = True
        if self.verbose:
            line = (
                f"Logs of Ray and other libraries are shown (verbose) and kept in {self.log.path}\n"
            )
        else:
            line = f"Logs of Ray and other libraries: {self.log.path} (--verbose or {VERBOSE_ENV}=1 shows them here)\n"
        self.terminal.write(line)
        self.terminal.flush()
        self.log.write(line)


_current: Console | None = None


def unrouted_stdout() -> TextIO:
    """The stdout under the routing: for output that is the command's own result and must reach
    the terminal whole (a job's logs, which hold its library lines too), never the log file."""
    return sys.stdout.terminal if isinstance(sys.stdout, LineRouter) else sys.stdout


def default_log_path(command: str, log_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(log_dir or os.environ.get(LOG_DIR_ENV) or "logs").resolve()
    return folder / f"tensormask-ray-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def routed(
    command: str, verbose: bool = False, log_dir: str | os.PathLike | None = None
) -> Iterator[Console]:
    """While the block runs, the terminal shows our lines only (all lines when verbose) and the
    log file gets everything. Logging handlers that captured the real stdout/stderr before (Ray's
    are made at import) write through the routers too. Nested use keeps the outer routing."""
    global _current
    if _current is not None:
        yield _current
        return
    saved = sys.stdout, sys.stderr
    console = Console(default_log_path(command, log_dir), is_verbose(verbose), saved[1])
    sys.stdout = LineRouter(saved[0], console.log, console.verbose, console.hidden)
    sys.stderr = LineRouter(saved[1], console.log, console.verbose, console.hidden)
    redirected = _redirect_handlers({id(saved[0]): sys.stdout, id(saved[1]): sys.stderr})
    _current = console
    try:
        yield console
    finally:
        if console.started_ray:  # so that no late worker output reaches the bare terminal
            import ray

            ray.shutdown()
        console.release_native_stderr()
        _current = None
        for handler, stream in redirected:
            handler.setStream(stream)
        for router in (sys.stdout, sys.stderr):
            router.flush()
        sys.stdout, sys.stderr = saved
        console.log.close()


def _redirect_handlers(streams: dict[int, TextIO]) -> list[tuple[logging.StreamHandler, TextIO]]:
    """Points every logging StreamHandler writing to a replaced stream at its router; returns
    (handler, original stream) pairs to undo it."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    done: list[tuple[logging.StreamHandler, TextIO]] = []
    for lg in loggers:
        for handler in lg.handlers:
            if type(handler) is logging.StreamHandler and id(handler.stream) in streams:
                done.append((handler, handler.setStream(streams[id(handler.stream)])))
    return done


@contextmanager
def log_only() -> Iterator[None]:
    """While the block runs, everything printed goes to the log file only (unless verbose): for
    steps whose own output would repeat what the caller says in one line."""
    routers = [s for s in (sys.stdout, sys.stderr) if isinstance(s, LineRouter)]
    for r in routers:
        r.flush()
        r.muted = True
    try:
        yield
    finally:
        for r in routers:
            r.flush()
            r.muted = False


@contextmanager
def hide_worker_lines(*tags: str) -> Iterator[None]:
    """While the block runs, lines with these tags from Ray workers go to the log file only (a
    sweep shows its trial events, not each trial's training progress)."""
    console = _current
    added = set(tags) - console.hidden if console is not None else set()
    if console is not None:
        console.hidden |= added
    try:
        yield
    finally:
        if console is not None:
            console.hidden -= added


def log_path() -> Path | None:
    """The current command's log file (None outside a routed command)."""
    return _current.log.path if _current is not None else None


def announce_log() -> None:
    """Prints where the logs go, unless already said (the log file's first write says it too)."""
    if _current is not None:
        _current.announce()


# A local Ray started here has at least this many logical CPUs: on a small machine, room for
# Ray Data tasks beside fractional-CPU Train workers or inference actors (../shared/NOTES.md).
MIN_LOCAL_CPUS = 4


def local_ray_cpus(address: str | None, needed: float = 0) -> int | None:
    """The `num_cpus` for `ray.init(address)`: for a local Ray started here (`address` None or
    "local", and RAY_ADDRESS not naming a cluster for None) max(MIN_LOCAL_CPUS, the machine's
    CPUs, ceil(needed)); None when joining a running cluster, which has its own count."""
    if address not in (None, "local") or (address is None and os.environ.get("RAY_ADDRESS")):
        return None
    return max(MIN_LOCAL_CPUS, os.cpu_count() or 1, math.ceil(needed))


class _RayDataBarsRestored(AbstractContextManager):
    """Puts a DataContext's progress-bar setting back at the end of a `with` statement."""

    def __init__(self, context, saved: bool) -> None:
        self.context, self.saved = context, saved

    def __exit__(self, *exc) -> None:
        self.context.enable_progress_bars = self.saved


def quiet_ray_data() -> AbstractContextManager:
    """No Ray Data progress bars in this process, from now on: bars drawn from its coordinator
    would cut through our lines, and in a log file they become hundreds of lines. Its execution
    plans still reach the log file. Used as `with quiet_ray_data():`, the setting is back as it
    was at the end of the statement."""
    import ray.data

    context = ray.data.DataContext.get_current()
    restore = _RayDataBarsRestored(context, context.enable_progress_bars)
    context.enable_progress_bars = False
    return restore


def add_address_argument(parser) -> None:
    """`--address`, the Ray cluster a command joins (handed to `ensure_ray`): one definition for
    every command that starts or joins Ray."""
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray; `local` forces a "
        "new one)",
    )


def ensure_ray(address: str | None = None, needed_cpus: float = 0) -> None:
    """Ray up, the one way every command starts or joins it: `ray.init(address)` unless Ray is
    up already, with worker output forwarded to this process (where the routers sort it) and a
    local Ray given `local_ray_cpus(address, needed_cpus)` logical CPUs. Ray Data progress bars
    are off unless verbose on a terminal. Prints where the logs go and the cluster it started."""
    import ray

    announce_log()
    if _current is not None:
        _current.capture_native_stderr()
    if not ray.is_initialized():
        cpus = local_ray_cpus(address, needed_cpus)
        context = ray.init(
            address=address, log_to_driver=True, **({"num_cpus": cpus} if cpus else {})
        )
        if _current is not None:
            _current.started_ray = True
        total = ray.cluster_resources().get("CPU", 0)
        dashboard = (
            f", dashboard http://{context.dashboard_url}"
            if getattr(context, "dashboard_url", None)
            else ""
        )
        print(f"Ray cluster with {total:g} CPUs{dashboard}", flush=True)
    if (_current is not None and not _current.verbose) or not sys.stdout.isatty():
        quiet_ray_data()


__all__ = [
    "LineRouter",
    "add_address_argument",
    "TAGS",
    "VERBOSE_ENV",
    "announce_log",
    "unrouted_stdout",
    "ensure_ray",
    "hide_worker_lines",
    "local_ray_cpus",
    "is_verbose",
    "log_only",
    "log_path",
    "quiet_ray_data",
    "routed",
]
