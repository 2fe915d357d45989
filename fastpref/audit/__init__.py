"""Offline compile audit: every GPU kernel of fastpref, compiled for GPUs that are not here.

The CPU can prove a kernel compiles, and how it compiles, without running it:

- Triton: every ``@triton.jit`` kernel in ``fastpref.kernels`` is launched through the real
  launchers of the Triton backend at every configuration they can pick (dtype, bias, trainable or
  frozen head, every loss type and reference mode, every block-size table entry), on meta tensors
  with the launch intercepted. Each distinct launch is compiled with Triton's own pipeline for
  sm_90 and sm_80 (``triton.compile`` with a ``GPUTarget``), down to a cubin with Triton's ptxas.
- CUDA: every ``csrc/*.cu`` is compiled for sm_90 and sm_80 by nvcc with ``-Xptxas -v``.

Each compiled kernel is a row: registers, spill bytes, shared memory, which tensor-core
instructions its matmuls lowered to (``wgmma`` on Hopper, ``mma.sync`` before), atomic
instructions, whether it uses TMA (bulk tensor copies) and whether it is warp-specialised (Triton
rows), compile time. A row fails on a compile error, any spill, shared memory over the
architecture's limit, or (sm_90, bf16/fp16) a matmul that does not lower to wgmma.
``fastpref kernels`` prints the table; its test fails CI on any failing row, and when a kernel
exists that no configuration launches.
"""
from .arches import ARCHES, Arch
from .report import AuditResult, AuditRow, audit, format_summary, format_table, violations

__all__ = ["ARCHES", "Arch", "AuditResult", "AuditRow", "audit", "format_summary", "format_table", "violations"]
