"""What every benchmark report carries: device, versions, command, date, the machine and how
busy it was, the table, and where the plot and the raw rows went."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch

# The machine counts as busy when other processes keep this many cores busy on average, or when
# the 1-minute load average beyond the benchmark's own busy cores exceeds this much per core.
BUSY_OTHERS_CORES = 0.25
BUSY_LOAD_PER_CORE = 0.5
# Before a measurement the machine is watched this long, this process idle, so that whatever
# its cores do meanwhile is the other processes' work.
IDLE_SAMPLE_S = 0.25
BUSY_EFFECT = (
    "Times, and above all the ratios between methods, are not reliable: on cores that other processes"
    " share, every parallel elementwise op waits for its slowest thread (measured: ~15x slower with two"
    " torch threads on two busy cores), so a method made of many elementwise passes (fastpref's blocked"
    " head on a CPU) slows down far more than one made of a few big matmuls (the materialized head), and"
    " rankings can invert; peak memory is not affected")
CLEAN_MEASUREMENT = (
    "For a clean measurement, rerun on a quiet machine (`uptime`: a 1-minute load average well below"
    " 0.5 per core), or give the benchmark fewer threads than there are idle cores"
    " (OMP_NUM_THREADS=<idle cores> fastpref bench ...)")


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads)"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> str:
    libraries = ", ".join(f"{name} {_version(name)}" for name in (
        "triton", "transformers", "liger-kernel", "cut-cross-entropy"))
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return f"torch {torch.__version__}{cuda}, {libraries}, python {platform.python_version()}"


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable tasks over the whole machine), or None off Linux."""
    try:
        with open("/proc/loadavg") as loadavg:
            return float(loadavg.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def usable_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_core_seconds() -> Optional[float]:
    """How long the CPUs this process may run on have been busy since boot, summed over them
    (user, nice, system, irq, softirq and steal: time a hypervisor gave another machine), from
    /proc/stat; None off Linux."""
    try:
        allowed = {f"cpu{index}" for index in os.sched_getaffinity(0)}
        ticks = 0
        with open("/proc/stat") as stat:
            for line in stat:
                fields = line.split()
                if fields and fields[0] in allowed:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                    ticks += user + nice + system + irq + softirq + steal
        return ticks / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class CpuReading:
    """The clocks that tell how busy the CPUs are, read at one moment."""

    wall_s: float
    own_s: float  # CPU time of this process (all its threads) and of the children it has waited for
    busy_s: Optional[float]  # busy_core_seconds()
    load: Optional[float]  # load_average()

    @classmethod
    def now(cls) -> "CpuReading":
        # the children count as this process: the compile gate's workers and its nvcc runs are its own work
        times = os.times()
        return cls(time.monotonic(), times.user + times.system + times.children_user + times.children_system,
                   busy_core_seconds(), load_average())


def others_busy_cores(start: CpuReading, end: CpuReading) -> Optional[float]:
    """How many of this process's cores other processes kept busy between two readings, on
    average; None where the busy time cannot be read."""
    elapsed = end.wall_s - start.wall_s
    if start.busy_s is None or end.busy_s is None or elapsed <= 0:
        return None
    return max(0.0, (end.busy_s - start.busy_s - (end.own_s - start.own_s)) / elapsed)


@dataclass(frozen=True)
class MachineLoad:
    """The machine a benchmark ran on and how busy it was, just before the measurement and over
    it: what every report carries beside its figures."""

    cpu: str
    cores: int  # online CPUs: the load average counts runnable tasks over all of them
    usable_cores: int  # the CPUs this process may run on
    torch_threads: int
    load_start: Optional[float]
    others_start: Optional[float]  # cores other processes kept busy just before the measurement
    load_end: Optional[float] = None
    others_during: Optional[float] = None  # cores other processes kept busy over the measurement, on average
    own_during: Optional[float] = None  # cores the benchmark itself kept busy, on average

    @property
    def load_beyond_own(self) -> Optional[float]:
        """The 1-minute load average at the end, less the benchmark's own busy cores."""
        if self.load_end is None or self.own_during is None:
            return None
        return self.load_end - self.own_during

    def busy_reasons(self) -> List[str]:
        """Why the machine counts as busy; empty when it was quiet (or nothing could be read)."""
        reasons = []
        for others, when in ((self.others_start, "just before the measurement"),
                             (self.others_during, "on average during it")):
            if others is not None and others >= BUSY_OTHERS_CORES:
                reasons.append(f"other processes kept {others:.2f} of the {self.usable_cores} cores the benchmark"
                               f" runs on busy {when}")
        beyond = self.load_beyond_own
        if beyond is not None and beyond > BUSY_LOAD_PER_CORE * self.cores:
            reasons.append(f"the 1-minute load average ended at {self.load_end:.2f}: {beyond:.2f} beyond the"
                           f" benchmark's own {self.own_during:.2f} busy cores, more than {BUSY_LOAD_PER_CORE} per"
                           f" core of the {self.cores}")
        return reasons

    def warning(self) -> Optional[str]:
        """What the report and the console say of a busy machine; None when it was quiet."""
        reasons = self.busy_reasons()
        if not reasons:
            return None
        return f"the machine was busy: {'; '.join(reasons)}. {BUSY_EFFECT}. {CLEAN_MEASUREMENT}."

    def describe(self) -> str:
        """The report's line on the machine."""
        def value(number: Optional[float]) -> str:
            return "n/a" if number is None else f"{number:.2f}"

        usable = "" if self.usable_cores == self.cores else f" ({self.usable_cores} usable)"
        return (f"CPU: {self.cpu}, {self.cores} cores{usable}, {self.torch_threads} torch threads; 1-minute load"
                f" average {value(self.load_start)} at the start, {value(self.load_end)} at the end; cores kept busy"
                f" by other processes: {value(self.others_start)} just before the measurement,"
                f" {value(self.others_during)} during it (by the benchmark: {value(self.own_during)})")


class MachineWatch:
    """How busy the machine is around a measurement: made right before it (it watches the
    machine for IDLE_SAMPLE_S, this process idle), finished right after."""

    def __init__(self) -> None:
        first = CpuReading.now()
        time.sleep(IDLE_SAMPLE_S)
        self._start = CpuReading.now()
        self.at_start = MachineLoad(cpu_model(), os.cpu_count() or 1, usable_cores(), torch.get_num_threads(),
                                    self._start.load, others_busy_cores(first, self._start))

    def finish(self) -> MachineLoad:
        end = CpuReading.now()
        elapsed = end.wall_s - self._start.wall_s
        return replace(self.at_start, load_end=end.load, others_during=others_busy_cores(self._start, end),
                       own_during=(end.own_s - self._start.own_s) / elapsed if elapsed > 0 else None)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(title: str, device: torch.device, command: str, machine: Optional[MachineLoad],
           notes: Iterable[str]) -> List[str]:
    """The report's title and reproduction lines; with `machine`, the CPU and how busy it was,
    and on a CPU device a warning when it was busy."""
    lines = [f"# {title}", "", f"- device: {device_name(device)}", f"- {versions()}", f"- command: `{command}`"]
    if machine is not None:
        lines.append(f"- {machine.describe()}")
        warning = machine.warning() if device.type == "cpu" else None
        if warning:
            lines.append(f"- **WARNING**: {warning}")
    return [*lines, f"- date: {utc_now()}", *(f"- {note}" for note in notes), ""]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_outputs(stem: Optional[str], report: str, rows: Sequence, machine: MachineLoad, plot=None) -> List[Path]:
    """Write `<stem>.md`, `<stem>.json` (the machine and the raw rows) and, given a plotting
    function of a path, `<stem>.png`; nothing without a stem. Returns the paths written."""
    if not stem:
        return []
    base = Path(stem)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if plot is not None:
        png = base.with_suffix(".png")
        if plot(png):
            written.append(png)
            report += f"\n![{base.name}]({png.name})\n"
    markdown = base.with_suffix(".md")
    markdown.write_text(report)
    raw = base.with_suffix(".json")
    raw.write_text(json.dumps({"machine": asdict(machine), "rows": [asdict(row) for row in rows]}, indent=1) + "\n")
    return [markdown, raw, *written]
