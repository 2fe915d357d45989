"""Compile one recorded Triton launch for a GPU that is not here, and read what came out.

The launch's arguments go through Triton's own binder for the target (the same specialisation
a GPU launch gets: pointer dtypes, integer widths, 16-divisibility), then ``triton.compile``
runs the full pipeline to a cubin with Triton's ptxas, whose ``-v`` report gives registers and
spills. The PTX shows the tensor-core instructions (``wgmma.mma_async`` is Hopper's warpgroup MMA;
``mma.sync`` the older per-warp one), any atomics, and TMA copies (``cp.async.bulk.tensor``); the
TritonGPU IR shows warp specialisation (a ``ttg.warp_specialize`` region: warps split into
producer and consumer partitions).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .arches import Arch
from .launches import Launch, first_tensor_dtype, kernel_key


@dataclass(frozen=True)
class CompileJob:
    """Everything needed to compile one launch in another process (all picklable)."""

    kernel: str  # "module.function"
    arch: str
    capability: int
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[Tuple[int, ...], object], ...]
    attrs: Tuple[Tuple[Tuple[int, ...], Tuple], ...]
    options: Tuple[Tuple[str, object], ...]
    dtype: Optional[str]

    @property
    def config(self) -> str:
        """The constexprs and launch options that select this binary, compactly."""
        names = dict(self.signature)
        arg_names = list(names)
        parts = [self.dtype or "-"]
        for (index,), value in sorted(self.constexprs):
            name = arg_names[index]
            if isinstance(value, bool):
                if value:
                    parts.append(name.lower())
            else:
                parts.append(f"{name.lower()}={value}")
        options = dict(self.options)
        parts.append(f"warps={options['num_warps']} stages={options['num_stages']}")
        unaligned = [arg_names[index] for (index,), attr in self.attrs
                     if names[arg_names[index]] in ("i32", "i64") and not attr]
        if unaligned:
            parts.append("unaligned=" + ",".join(unaligned))
        return " ".join(parts)


@dataclass
class CompileResult:
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    tensor_cores: str = "-"
    atomics: Optional[int] = None
    compile_s: Optional[float] = None
    error: Optional[str] = None
    tma: Optional[bool] = None
    warp_specialized: Optional[bool] = None


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def compile_job(launch: Launch, arch: Arch) -> CompileJob:
    """Bind a recorded launch for `arch` the way a launch on such a GPU would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch.capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args,
                                                              specialization, options)
    return CompileJob(
        kernel=kernel_key(kernel), arch=arch.name, capability=arch.capability,
        signature=tuple(signature.items()),
        constexprs=tuple(sorted((key, _hashable(value)) for key, value in constexprs.items())),
        attrs=tuple(sorted((key, _hashable(value)) for key, value in attrs.items())),
        options=tuple(sorted((key, _hashable(value)) for key, value in vars(options).items())),
        dtype=first_tensor_dtype(launch.args),
    )


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STATIC_SHARED = re.compile(r"(\d+) bytes smem")


def read_ptxas_report(log: str) -> Tuple[Optional[int], Optional[int], int]:
    """(registers, spill bytes stored + loaded, static shared bytes) from ptxas -v output."""
    registers = _REGISTERS.search(log)
    spills = _SPILLS.search(log)
    static_shared = _STATIC_SHARED.search(log)
    return (int(registers.group(1)) if registers else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None,
            int(static_shared.group(1)) if static_shared else 0)


def tensor_core_kind(ptx: str, ttir: str) -> str:
    """Which instructions the kernel's matmuls became: wgmma, mma.sync, fma (no tensor cores),
    or "-" when it has no matmul."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma" if "tt.dot" in ttir else "-"


def uses_tma(ptx: str) -> bool:
    """Whether the kernel moves tiles with the Tensor Memory Accelerator (bulk tensor copies)."""
    return "cp.async.bulk.tensor" in ptx


def is_warp_specialized(ttgir: str) -> bool:
    """Whether the compiler split the kernel's warps into specialised partitions."""
    return "ttg.warp_specialize" in ttgir


def count_atomics(ptx: str) -> int:
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", ptx, flags=re.MULTILINE))


def run_compile(job: CompileJob) -> CompileResult:
    """Compile `job` (in whichever process calls this) and measure the result."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, _, function_name = job.kernel.rpartition(".")
    kernel = getattr(importlib.import_module(module_name), function_name)
    source = ASTSource(kernel, dict(job.signature),
                       {key: value for key, value in job.constexprs},
                       {key: [list(attr) for attr in value] for key, value in job.attrs})
    log = io.StringIO()
    began = time.perf_counter()
    try:
        # A cache hit skips ptxas and so its report: every compile goes to a fresh cache.
        with tempfile.TemporaryDirectory() as cache_dir, contextlib.redirect_stdout(log):
            knobs.cache.dir = cache_dir
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(source, target=GPUTarget("cuda", job.capability, 32),
                                      options=dict(job.options))
    except Exception as exc:  # noqa: BLE001 - a compile error is this row's result
        return CompileResult(error=f"{type(exc).__name__}: {_error_summary(str(exc))}",
                             compile_s=time.perf_counter() - began)
    registers, spills, static_shared = read_ptxas_report(log.getvalue())
    return CompileResult(
        registers=registers, spill_bytes=spills,
        shared_bytes=compiled.metadata.shared + static_shared,
        tensor_cores=tensor_core_kind(compiled.asm["ptx"], compiled.asm["ttir"]),
        atomics=count_atomics(compiled.asm["ptx"]),
        compile_s=time.perf_counter() - began,
        tma=uses_tma(compiled.asm["ptx"]),
        warp_specialized=is_warp_specialized(compiled.asm["ttgir"]),
    )


def _error_summary(text: str) -> str:
    """Where it failed and why: Triton's errors open with the location and end with the message,
    with the kernel's source between."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:1] + lines[-2:] if len(lines) > 3 else lines)


def worker_setup() -> None:
    """Process-pool initializer: the compiler, never the interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)


def distinct_jobs(launches: List[Launch], arch: Arch,
                  on_bound: Callable[[], object] = lambda: None) -> Dict[CompileJob, List[str]]:
    """The distinct compile jobs of `launches` on `arch`, each with the scenarios that launch it;
    `on_bound` is called after each launch."""
    jobs: Dict[CompileJob, List[str]] = {}
    for launch in launches:
        jobs.setdefault(compile_job(launch, arch), []).append(launch.scenario)
        on_bound()
    return jobs
