"""What the benchmark scripts share: clocks, min / median / max, ratios, Markdown, the machine.

Each scripts/bench_*.py is the experiment it runs (what is set up, what is measured, what is
compared); the mechanics live here. It sits next to them, not in the dmzctl package: it is
tooling for measuring dmzctl, not part of what gets installed. The scripts import it as
`benchlib` (their own folder is first on sys.path); tests/test_benchlib.py adds scripts/ to it.

Standard library only: the benchmarks' cold worker processes import this too, and must not pay
for more than they measure.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

REPO = Path(__file__).resolve().parents[1]
START = time.monotonic()


def use_working_tree() -> None:
    """Import dmzctl from this working tree, not from an installed copy."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the script started."""
    print(f"[{time.monotonic() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so that the clean-up in `finally` runs."""


def interrupt_on_signals() -> None:
    def interrupted(signum, _frame):
        raise Interrupted(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)


def publish(text: str, output: Path) -> None:
    """Write the report, print it as well, and say where it went."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text, end="")
    log(f"wrote {output}")


# --- timing: wall clock (perf_counter) -------------------------------------------------------

class Stopwatch:
    """`with Stopwatch() as clock: ...` then `clock.seconds` (set also when the block raises)."""

    seconds: float

    def __enter__(self) -> "Stopwatch":
        self.began = time.perf_counter()
        return self

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self.began


def repeat(call: Callable[[], Any], runs: int) -> list[float]:
    """The seconds each of `runs` calls took."""
    times = []
    for _ in range(runs):
        with Stopwatch() as clock:
            call()
        times.append(clock.seconds)
    return times


class Tally:
    """Time summed per label over any number of calls, and how many calls."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, label: str, seconds: float) -> None:
        self.totals[label] = self.totals.get(label, 0.0) + seconds
        self.calls[label] = self.calls.get(label, 0) + 1

    def time(self, label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """call(*args, **kwargs), timed under `label` (counted also when it raises)."""
        began = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.add(label, time.perf_counter() - began)

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.totals), dict(self.calls)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


class Probe(Tally):
    """Times named functions where they are called from: each wrapped one adds its inclusive time
    under its label; `restore()` puts the originals back."""

    def __init__(self) -> None:
        super().__init__()
        self._saved: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []  # functions the code under test no longer has

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:  # changed under the benchmark: its row stays empty
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return

        @functools.wraps(original)
        def timed(*args, **kwargs):
            return self.time(label, original, *args, **kwargs)

        self._saved.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


# --- statistics --------------------------------------------------------------------------------

class Summary(NamedTuple):
    min: float
    median: float
    max: float
    n: int


def summary(values: Iterable[Optional[float]]) -> Optional[Summary]:
    """min, median, max and count of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Summary(min(present), statistics.median(present), max(present), len(present))


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    found = summary(values)
    return found.median if found else None


# --- formatting --------------------------------------------------------------------------------

def duration(seconds: Optional[float], *, coarse: bool = False) -> str:
    """A wall-clock time with its unit: 0.7 ms, 18.5 ms, 2.91 s, 6,692 s; None is "n/a".

    Milliseconds get one decimal; with `coarse`, only below 10 ms (338 ms, not 338.4 ms).
    """
    if seconds is None:
        return "n/a"
    if abs(seconds) >= 100:
        return f"{seconds:,.0f} s"
    if abs(seconds) >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if coarse and abs(ms) >= 10 else f"{ms:.1f} ms"


def spread(values: Iterable[Optional[float]], fmt: Callable[[float], str] = duration, empty: str = "n/a") -> str:
    """min / median / max (None values left out)."""
    found = summary(values)
    if found is None:
        return empty
    return f"{fmt(found.min)} / {fmt(found.median)} / {fmt(found.max)}"


def median_range(values: list[float], fmt: Callable[[float], str]) -> str:
    """The median, and (min–max) when there was more than one run."""
    found = summary(values)
    middle = fmt(found.median)
    return middle if found.n < 2 else f"{middle} ({fmt(found.min)}–{fmt(found.max)})"


def ratio(value: float) -> str:
    """Two decimals, or two significant digits for small ratios, never in e-notation."""
    if value >= 0.1 or value <= 0:
        return f"{value:.2f}"
    digits = 1 - math.floor(math.log10(value))
    return f"{value:.{digits}f}"


def load_average(values: Optional[Iterable[float]] = None, sep: str = " / ") -> str:
    """The 1, 5 and 15 minute load averages (now, unless given)."""
    return sep.join(f"{x:.2f}" for x in (os.getloadavg() if values is None else values))


def load1() -> float:
    return os.getloadavg()[0]


# --- Markdown ----------------------------------------------------------------------------------

def table(header: list[str], rows: Iterable[Iterable[Any]], align: str = "") -> str:
    """A Markdown table: the header, the alignment row, the rows (cells with str()).

    `align` has a letter per column, "r" for right-aligned (figures), anything else for the
    default; missing letters mean the default. An empty cell is a single space: `| | |`.
    """
    def line(cells: Iterable[Any]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    marks = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]
    return "\n".join([line(header), "|" + "|".join(marks) + "|", *(line(row) for row in rows)])


class Report:
    """A Markdown document built block by block (heading, paragraph, table, list), one blank
    line between blocks, ending with a newline."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def add(self, *blocks: str) -> None:
        self.blocks.extend(blocks)

    def table(self, header: list[str], rows: Iterable[Iterable[Any]], align: str = "") -> None:
        self.blocks.append(table(header, rows, align))

    def text(self) -> str:
        return "\n\n".join(block.rstrip("\n") for block in self.blocks) + "\n"


# --- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return found.group(1).strip() if found else (platform.processor() or "unknown")


def hardware_virtualization() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return " vmx" in flags or " svm" in flags


def memory() -> str:
    found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return f"{int(found.group(1)) / 1024 / 1024:.1f} GiB" if found else "?"


def kernel(full: bool = False) -> str:
    """Linux 6.1.0-x; with `full`, also its build line and the architecture."""
    uname = os.uname()
    if full:
        return f"{uname.sysname} {uname.release} {uname.version} {uname.machine}"
    return f"{uname.sysname} {uname.release}"


def os_name() -> str:
    try:
        return re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        return "?"


def tool_version(argv: list[str], missing: str = "not found") -> str:
    """The first line a tool prints for its version (stdout, else stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return missing


def revision(path: str = "dmzctl") -> str:
    """This working tree's commit, noting uncommitted changes under `path`."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", path], capture_output=True,
                           text=True).stdout.strip()
    return f"{commit}{f' with uncommitted changes in {path}/' if dirty else ''}"
