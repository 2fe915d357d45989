"""What every benchmark report carries: device, versions, command, date, machine load, the
table, and where the plot and the raw rows went."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch

# A 1-minute load average above this marks the report's times as taken on a shared machine.
SHARED_LOAD = 2.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"


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
    """The 1-minute load average, or None off Linux."""
    try:
        with open("/proc/loadavg") as loadavg:
            return float(loadavg.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(title: str, device: torch.device, command: str, load: Sequence[Optional[float]],
           notes: Iterable[str]) -> List[str]:
    """The report's title and reproduction lines. `load`: load averages before and after the run;
    above SHARED_LOAD on a CPU the times are marked as taken on a shared machine."""
    known = [value for value in load if value is not None]
    shared = []
    if device.type == "cpu" and known and max(known) > SHARED_LOAD:
        shared = [f"- note: the machine was shared with other jobs (load average {known[0]:.1f} before"
                  f" the run, {known[-1]:.1f} after, {os.cpu_count()} cores): times are noisy, peak"
                  " memory is not affected"]
    return [f"# {title}", "", f"- device: {device_name(device)}", f"- {versions()}", f"- command: `{command}`",
            *shared, f"- date: {utc_now()}", *(f"- {note}" for note in notes), ""]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_outputs(stem: Optional[str], report: str, rows: Sequence, plot=None) -> List[Path]:
    """Write `<stem>.md`, `<stem>.json` (the raw rows) and, given a plotting function of a path,
    `<stem>.png`; nothing without a stem. Returns the paths written."""
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
    raw.write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    return [markdown, raw, *written]
