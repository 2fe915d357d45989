"""Measuring a step: peak memory over what is allocated when it starts, and its time.

Every method of one comparison is measured in the same process on the same inputs: each is first
run once and judged against a reference (a fast wrong answer is never timed), then warmed up and
run once more for its peak memory; the timed runs then go round the methods in turn, so that
clock boosts, thermal drift or a neighbour's load fall on all of them alike, and the median of
each method's runs is reported.

While it goes, a benchmark says where it is through a Progress: the step under way, and the
share of its planned work done, for a progress bar with an estimate of the time left.

Memory on CUDA comes from the caching allocator's statistics (max_memory_allocated after a peak
reset, over memory_allocated at the start); on Linux CPUs from the process's resident-set
high-water mark (VmHWM), which the harness resets before each run. Elsewhere it is "n/a".
"""
from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

MIB = float(1 << 20)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def _set_malloc(measuring_memory: bool) -> None:
    """Tune glibc's malloc for a memory measurement, or back to how it settles in a long run.

    glibc serves big blocks with mmap, but after one is freed it raises its mmap threshold (up to
    32 MiB, with a trim threshold of twice that) and keeps later blocks of that size in the heap,
    resident after they are freed: freed memory would inflate a run's peak, and one run's
    leftovers would hide the next run's. While measuring, a fixed 1 MiB mmap threshold unmaps
    every sizeable tensor on free and a 128 KiB trim threshold shrinks the heap top (smaller
    blocks stay in the heap; PeakMemory.start trims it). That costs a page fault per fresh page,
    so timed runs use the 32 MiB / 64 MiB thresholds glibc itself ends up with.
    """
    if _LIBC is None:
        return
    if measuring_memory:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    else:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _read_proc_status() -> dict:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_resident_peak() -> bool:
    """Reset the process's VmHWM to its current resident size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return "VmHWM" in _read_proc_status()
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    """How PeakMemory measures on `device`, for reports."""
    if device.type == "cuda":
        return "CUDA max_memory_allocated() over memory_allocated() at the start of the run"
    if reset_resident_peak():
        return "process peak resident memory (VmHWM) over resident memory at the start of the run"
    return "n/a: needs /proc/self/clear_refs (Linux)"


class PeakMemory:
    """Peak memory a piece of code adds over what is allocated when it starts, in MiB.

    CUDA: max_memory_allocated() - memory_allocated() at start (the caching allocator's view of
    live tensors, not what it has reserved). CPU on Linux: VmHWM - VmRSS at start, after returning
    freed heap memory to the OS. On CPU every resident page counts, so this includes the
    allocator's slack and anything else the process touches meanwhile.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.supported = device.type == "cuda" or (device.type == "cpu" and reset_resident_peak())
        self._base = 0
        if self.supported and device.type == "cpu":
            _set_malloc(measuring_memory=False)  # the same allocator state for every run

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.supported:
            gc.collect()
            _set_malloc(measuring_memory=True)
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            reset_resident_peak()
            self._base = _read_proc_status()["VmRSS"]

    def stop(self) -> Optional[float]:
        if not self.supported:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
        peak = _read_proc_status()["VmHWM"] - self._base
        _set_malloc(measuring_memory=False)
        return peak / MIB


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        phrase in message for phrase in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(step: Callable[[], Any], device: torch.device) -> float:
    """One run of `step`: CUDA events around it on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    begin_s = time.perf_counter()
    step()
    return (time.perf_counter() - begin_s) * 1e3


@dataclass
class Progress:
    """Where a benchmark is. `describe(text)` names the step under way; `advance(work)` adds work
    done, in the units of the op's planned_work: each group of measurements is worth its size
    (its FLOPs or tokens, times its runs), so that a rate measured on small groups predicts the
    large ones."""

    describe: Callable[[str], None] = lambda text: None
    advance: Callable[[float], None] = lambda work: None

    def within(self, prefix: str) -> "Progress":
        """The same progress, its descriptions under `prefix` (a group of measurements in the op)."""
        return Progress(lambda text: self.describe(f"{prefix}: {text}"), self.advance)


@dataclass
class Candidate:
    """One method's step on shared inputs. `check` judges the step's first output (and records its
    errors wherever the caller keeps them); `reset` runs after every step (clear gradients)."""

    name: str
    step: Callable[[], Any]
    check: Callable[[Any], bool]
    reset: Callable[[], None] = lambda: None


@dataclass
class Measurement:
    """status: "ok", "OOM", "WRONG" or "ERROR: <type>: <message>"; the numbers are None unless
    measured."""

    status: str = "ok"
    time_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)


ERROR = "ERROR"


def error_status(exc: BaseException) -> str:
    """A failed method's row status: "ERROR: <type>: <first line of the message>"."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{ERROR}: {type(exc).__name__}: {message}".rstrip(": ")


def is_failure(status: str) -> bool:
    """A row that gave a wrong answer or raised: the op goes on, the exit status says so."""
    return status == "WRONG" or status.startswith(ERROR)


def _attempt(run: Callable[[], Any]) -> Optional[str]:
    """Run; None when it finished, else the row status it earned: "OOM" when it ran out of
    memory, "ERROR: ..." for any other exception (its frames are gone either way). A broken
    method is a row, never the end of the comparison; Ctrl-C still stops the run."""
    try:
        run()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure of one method is that method's result
        return "OOM" if is_out_of_memory(exc) else error_status(exc)


def _prepare(candidate: Candidate, warmup: int, meter: PeakMemory, result: Measurement) -> None:
    """Check, warm up and take the peak memory of one candidate, filling `result`."""

    def check_warm_and_weigh() -> None:
        output = candidate.step()
        right = candidate.check(output)
        del output
        candidate.reset()
        if not right:
            result.status = "WRONG"
            return
        for _ in range(warmup - 1):
            candidate.step()
            candidate.reset()
        meter.start()
        candidate.step()
        result.peak_mib = meter.stop()
        candidate.reset()

    failed = _attempt(check_warm_and_weigh)
    if failed:
        result.status, result.peak_mib = failed, None
    candidate.reset()
    release_memory(meter.device)


def timing_note(warmup: int, repeat: int) -> str:
    """How measure_interleaved takes its times, for reports."""
    return (f"time: median of {repeat} runs, taken in rounds over the methods, after {warmup} warm-up"
            " run(s) and the memory run")


def build_candidates(rows: Sequence, build: Callable[[Any], Any]) -> Tuple[List, List[Candidate]]:
    """(rows to measure, their candidates): `build(row)` gives the row's Candidate, or a status
    string when the method cannot run here; a build that raises gives the row its error status,
    and the other rows go on."""
    measured, candidates = [], []
    for row in rows:
        try:
            candidate = build(row)
        except Exception as exc:  # noqa: BLE001 - a method that cannot even be set up is its row's result
            row.status = "OOM" if is_out_of_memory(exc) else error_status(exc)
            continue
        if isinstance(candidate, str):
            row.status = candidate
            continue
        measured.append(row)
        candidates.append(candidate)
    return measured, candidates


def runs_per_method(warmup: int, repeat: int) -> int:
    """How often measure_interleaved runs each method: the checked run and the rest of the
    warm-up, the memory run, the timed runs."""
    return warmup + 1 + repeat


def measure_rows(rows: Sequence, candidates: Sequence[Candidate], device: torch.device, warmup: int, repeat: int,
                 progress: Progress = Progress(), work: float = 1.0) -> None:
    """measure_interleaved, its results written onto each candidate's row (status, time_ms, peak_mib)."""
    for row, result in zip(rows, measure_interleaved(candidates, device, warmup, repeat, progress, work)):
        row.status, row.time_ms, row.peak_mib = result.status, result.time_ms, result.peak_mib


def measure_interleaved(candidates: Sequence[Candidate], device: torch.device, warmup: int, repeat: int,
                        progress: Progress = Progress(), work: float = 1.0) -> List[Measurement]:
    """Measure every candidate on the same inputs: check, warm-up and memory one after the other,
    then `repeat` timed rounds over all of them; the median time of each. `work` is advanced on
    `progress` run by run, the runs a failed candidate no longer needs at once."""
    meter = PeakMemory(device)
    results = [Measurement() for _ in candidates]
    if not candidates:
        progress.advance(work)
    run_work = work / max(1, len(candidates) * runs_per_method(warmup, repeat))
    for candidate, result in zip(candidates, results):
        progress.describe(f"{candidate.name}: check, warm-up, memory")
        _prepare(candidate, warmup, meter, result)
        progress.advance(run_work * (warmup + 1))
    for round_index in range(repeat):
        for candidate, result in zip(candidates, results):
            if result.status == "ok":
                progress.describe(f"timing round {round_index + 1}/{repeat}: {candidate.name}")
                failed = _attempt(lambda: result.times_ms.append(time_ms(candidate.step, device)))
                if failed:
                    result.status, result.peak_mib = failed, None
                candidate.reset()
            progress.advance(run_work)
    for result in results:
        if result.status == "ok":
            result.time_ms = statistics.median(result.times_ms)
        else:
            result.times_ms.clear()
    release_memory(device)
    return results
