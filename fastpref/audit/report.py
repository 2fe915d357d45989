"""The audit as rows, the rules a row must pass, and the table ``fastpref kernels`` prints."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..bench.report import markdown_table, number
from ..progress import progress_bar
from .arches import ARCHES, Arch

HALF_DTYPES = ("bfloat16", "float16")


@dataclass
class AuditRow:
    """One kernel binary: a Triton kernel at one configuration, or one csrc/ kernel, on one arch."""

    language: str  # "triton" or "cuda"
    kernel: str
    config: str
    arch: str
    dtype: Optional[str]
    registers: Optional[int]
    spill_bytes: Optional[int]
    shared_bytes: Optional[int]
    tensor_cores: str
    atomics: Optional[int]
    compile_s: Optional[float]
    error: Optional[str] = None
    scenarios: List[str] = field(default_factory=list)
    tma: Optional[bool] = None  # TMA bulk tensor copies in the code (None: not read, csrc/)
    warp_specialized: Optional[bool] = None  # warps split into specialised partitions (None: not read)

    @property
    def short_kernel(self) -> str:
        """The function's name: "_forward_kernel" of "fastpref.kernels.m._forward_kernel", or
        "slab_softmax_kernel" of "slab_epilogues.cu:slab_softmax_kernel"."""
        return self.kernel.rsplit(":" if self.language == "cuda" else ".", 1)[-1]


def violations(row: AuditRow) -> List[str]:
    """Why `row` would fail on a GPU (or hide a slow path there); empty when it passes."""
    if row.error:
        return [f"compile error: {row.error}"]
    problems = []
    if row.registers is None or row.spill_bytes is None:
        problems.append("no ptxas report (registers/spills unknown)")
    if row.spill_bytes:
        problems.append(f"spills {row.spill_bytes} bytes to local memory")
    limit = ARCHES[row.arch].shared_memory_bytes
    if row.shared_bytes is not None and row.shared_bytes > limit:
        problems.append(f"shared memory {row.shared_bytes} B over the {row.arch} limit of {limit} B")
    if (row.language == "triton" and ARCHES[row.arch].has_wgmma and row.dtype in HALF_DTYPES
            and row.tensor_cores in ("mma.sync", "fma")):
        problems.append(f"{row.dtype} matmul lowers to {row.tensor_cores}, not wgmma")
    return problems


@dataclass
class AuditResult:
    rows: List[AuditRow]
    uncovered: List[str]  # kernels no configuration launches
    missing_tools: List[str]

    @property
    def failures(self) -> List[Tuple[AuditRow, List[str]]]:
        return [(row, problems) for row in self.rows if (problems := violations(row))]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.uncovered


def _triton_rows(arches: Sequence[Arch], workers: int, progress: bool) -> Tuple[List[AuditRow], List[str]]:
    from .launches import discover_kernels, record_launches, uncovered_kernels
    from .triton_compile import distinct_jobs, run_compile, worker_setup

    with progress_bar("Triton: recording the launchers' launches", len(ARCHES), enabled=progress,
                      counting="architectures") as bar:
        discovered = discover_kernels()
        recorded = {}
        for arch in ARCHES.values():
            recorded[arch] = record_launches(arch)
            bar.update()
    # coverage counts every architecture's launches, compiled or not: a kernel that one never
    # launches (the TMA-fed ones on sm_80) is covered by another
    uncovered = uncovered_kernels(discovered, [launch for launches in recorded.values() for launch in launches])
    jobs: Dict = {}
    with progress_bar("Triton: binding each launch as a GPU would", sum(len(recorded[arch]) for arch in arches),
                      enabled=progress, counting="launches") as bar:
        for arch in arches:
            jobs.update(distinct_jobs(recorded[arch], arch, on_bound=bar.update))
    ordered = list(jobs)
    results = [None] * len(ordered)
    with progress_bar("Triton: compiling", len(ordered), enabled=progress, counting="binaries") as bar:
        def compiled(index: int, result) -> None:
            results[index] = result
            bar.update()
            bar.set_description_str(f"Triton: compiled {ordered[index].kernel.rsplit('.', 1)[-1]} for "
                                    f"{ordered[index].arch}", refresh=True)

        if workers <= 1:
            for index, job in enumerate(ordered):
                compiled(index, run_compile(job))
        else:
            # Spawned workers: a fork of a process that has loaded torch and Triton is not safe.
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_setup) as pool:
                futures = {pool.submit(run_compile, job): index for index, job in enumerate(ordered)}
                for future in concurrent.futures.as_completed(futures):
                    compiled(futures[future], future.result())
    rows = [AuditRow("triton", job.kernel, job.config, job.arch, job.dtype, result.registers, result.spill_bytes,
                     result.shared_bytes, result.tensor_cores, result.atomics, result.compile_s, result.error,
                     jobs[job], tma=result.tma, warp_specialized=result.warp_specialized)
            for job, result in zip(ordered, results)]
    return rows, uncovered


def audit(arch_names: Sequence[str] = tuple(ARCHES), *, triton: bool = True, cuda: bool = True,
          workers: Optional[int] = None, progress: bool = False) -> AuditResult:
    """Compile every kernel for every arch in `arch_names` and measure each binary; with
    `progress`, a bar per phase on a terminal's stderr."""
    from .cuda_compile import audit_csrc, csrc_dir, find_nvcc

    # Fused multiply-add on, as Triton compiles on a GPU by default (and without its warning);
    # spawned compiler processes inherit it.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arches = [ARCHES[name] for name in arch_names]
    rows: List[AuditRow] = []
    uncovered: List[str] = []
    missing = []
    if triton:
        triton_rows, uncovered = _triton_rows(arches, workers or os.cpu_count() or 1, progress)
        rows += triton_rows
    if cuda:
        if csrc_dir() is None:
            missing.append("csrc/ (not a source checkout): CUDA kernels not audited")
        elif find_nvcc() is None:
            missing.append("nvcc (not on PATH or in $CUDA_HOME/bin): CUDA kernels not audited")
        else:
            rows += audit_csrc(arches, progress)
    return AuditResult(rows, uncovered, missing)


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _yes_no(value: Optional[bool]) -> str:
    return "-" if value is None else "yes" if value else "no"


def format_table(rows: Sequence[AuditRow]) -> str:
    """One markdown row per binary: kernel, config, arch, registers, spills, smem, MMA, atomics,
    TMA, warp specialisation, time."""
    def cells(row: AuditRow) -> List[str]:
        problems = violations(row)
        return [f"{row.language}:{row.short_kernel}", row.config, row.arch, _count(row.registers),
                _count(row.spill_bytes), _count(row.shared_bytes), row.tensor_cores, _count(row.atomics),
                _yes_no(row.tma), _yes_no(row.warp_specialized),
                number(row.compile_s, 2), "FAIL: " + "; ".join(problems) if problems else "ok"]

    return markdown_table(["kernel", "config", "arch", "registers", "spills (B)", "shared memory (B)",
                           "tensor cores", "atomics", "TMA", "warp-specialised", "compile (s)", "status"],
                          map(cells, rows))


def format_summary(rows: Sequence[AuditRow]) -> str:
    """One markdown row per kernel and arch: how many binaries, and their worst figures."""
    groups: Dict[Tuple[str, str, str], List[AuditRow]] = defaultdict(list)
    for row in rows:
        groups[(row.language, row.short_kernel, row.arch)].append(row)

    def span(values) -> str:
        values = [value for value in values if value is not None]
        return f"{min(values)}-{max(values)}" if values else "-"

    return markdown_table(
        ["kernel", "arch", "binaries", "registers", "max spills (B)", "max shared memory (B)", "tensor cores",
         "atomics", "TMA", "warp-specialised", "compile (s, sum)", "failing"],
        ([f"{language}:{kernel}", arch, str(len(members)), span(row.registers for row in members),
          _count(max((row.spill_bytes or 0) for row in members)),
          _count(max((row.shared_bytes or 0) for row in members)),
          ", ".join(sorted({row.tensor_cores for row in members})), span(row.atomics for row in members),
          ", ".join(sorted({_yes_no(row.tma) for row in members})),
          ", ".join(sorted({_yes_no(row.warp_specialized) for row in members})),
          f"{sum(row.compile_s or 0.0 for row in members):.1f}",
          str(sum(1 for row in members if violations(row)))]
         for (language, kernel, arch), members in sorted(groups.items())))
