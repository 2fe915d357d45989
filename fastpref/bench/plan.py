"""Cost model of the LM-head step: every kernel and GEMM a design launches, and its predicted time.

For a shape (N scored tokens, H, V), a dtype width, a head (trainable or frozen) and a GPU kind,
each launch is counted in FLOPs, HBM bytes and float32 atomic bytes, and its time predicted as the
largest of three:

    compute   FLOPs / rate,  rate = min(matmul peak, operand intensity of its tile x L2 bandwidth)
              (a cuBLAS GEMM runs at the matmul peak: it picks tiles that reach it)
    memory    HBM bytes / HBM bandwidth
    atomics   atomic bytes / the L2's float32 read-modify-write throughput

A tile of BM x BN outputs that walks K loads (BM + BN) K elements for 2 BM BN K FLOPs: its operand
intensity is 2 BM BN / ((BM + BN) * element bytes) FLOP per byte of L2 -> SM traffic (64 x 128
bf16: 43; 128 x 128: 64; 128 x 256: 85). The L2 bandwidth and atomic throughput are uncertain,
so every prediction is a range (the fast end of both, the slow end of both). These are model
estimates, not measurements: ``fastpref plan`` says so, and the GPU proof run prints the
measured rows beside it.

Designs:
  atomic  the Triton backend today: a fused forward (GEMM + online log-sum-exp, 64 x 128 tiles);
          a backward of one tile per program that recomputes its logits and adds its share of
          d_hidden and d_weight with float32 atomics (frozen head: 6NHV in all, trainable: 8NHV).
  slab    the Triton backend now. Trainable head: the fused forward (128 x 128 tiles), then per
          vocabulary slab of all N rows (width Vs from the scratch budget) a fused recompute + dz
          epilogue into a bf16 scratch, d_weight_s = dz^T h (cuBLAS, written once) and
          d_hidden += dz W_s (a Triton GEMM whose epilogue keeps the sum as a bf16 pair): 8NHV,
          no atomics. Frozen head: the torch backend's pass, in blocks of R rows x S columns that
          fit the scratch budget: the logits z = h W_s^T in float32 and u <- u alpha + p~ W_s
          (cuBLAS) with the running max and sum taken between them, so the backward is
          d_hidden = g u: 4NHV. Its blocks are many small launches from Python (about a dozen
          per block): the host must issue them faster than the GPU runs them.
  cuda    the CUDA backend (no Triton): the slab algorithm with every matmul a cuBLAS GEMM and
          the csrc/ epilogues between them, slabs of float32 logits plus a dz scratch. Trainable
          head: per slab x_s = h W_s^T (float32 out), the online-softmax epilogue; in the backward
          x_s again, the dz epilogue, d_weight_s = dz^T h, and d_hidden from float32 products in
          row chunks (over the dead logits slab) folded into hi + lo (half precision) by the
          compensated accumulation: 8NHV, no atomics. Frozen head: the torch backend's slab pass,
          as in the slab design.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..backends.scratch import DEFAULT_SCRATCH_BYTES, slab_columns
from ..backends.torch_backend import gpu_block_sizes
from .report import markdown_table

HEADS = ("trainable", "frozen")
DESIGNS = ("atomic", "slab", "cuda")
FP32 = 4


@dataclass(frozen=True)
class DeviceKind:
    """matmul_tflops: what a large dense cuBLAS GEMM reaches (not the datasheet figure)."""

    name: str
    matmul_tflops: float
    hbm_tb_s: float
    l2_tb_s: Tuple[float, float]
    atomic_tb_s: Tuple[float, float]


DEVICE_KINDS = {
    "h100": DeviceKind("H100 SXM", 790.0, 3.35, (5.5, 8.0), (1.8, 3.2)),
    "h200": DeviceKind("H200", 790.0, 4.8, (5.5, 8.0), (1.8, 3.2)),
    "a100": DeviceKind("A100 SXM", 280.0, 2.0, (3.5, 5.0), (1.0, 1.8)),
}


@dataclass(frozen=True)
class Shape:
    n: int
    hidden: int
    vocab: int
    element_bytes: int = 2  # bf16


@dataclass
class Launch:
    """One kind of launch of a design, `count` times; figures are for all of them together."""

    name: str
    count: int
    flops: float
    hbm_bytes: float
    atomic_bytes: float = 0.0
    tile: Optional[Tuple[int, int]] = None  # (BM, BN) of a fused kernel; None: a cuBLAS GEMM or elementwise

    def predicted_ms(self, device: DeviceKind, element_bytes: int) -> Tuple[float, float]:
        """(fast, slow) predicted time in ms."""
        times = []
        for l2, atomics in ((device.l2_tb_s[1], device.atomic_tb_s[1]), (device.l2_tb_s[0], device.atomic_tb_s[0])):
            rate = device.matmul_tflops * 1e12
            if self.tile is not None:
                rate = min(rate, operand_intensity(self.tile, element_bytes) * l2 * 1e12)
            seconds = max(self.flops / rate, self.hbm_bytes / (device.hbm_tb_s * 1e12),
                          self.atomic_bytes / (atomics * 1e12))
            times.append(seconds * 1e3)
        return times[0], times[1]


def operand_intensity(tile: Tuple[int, int], element_bytes: int) -> float:
    bm, bn = tile
    return 2 * bm * bn / ((bm + bn) * element_bytes)


def flop_floor(shape: Shape, head: str) -> float:
    return (8 if head == "trainable" else 4) * shape.n * shape.hidden * shape.vocab


def slab_width(shape: Shape, scratch_bytes: int) -> int:
    """The Triton backward's slab: the widest multiple of its 128-column tile whose [N, Vs]
    scratch fits the budget."""
    return slab_columns(shape.n, shape.vocab, shape.element_bytes, scratch_bytes, 128)


def frozen_blocks(shape: Shape, scratch_bytes: int) -> Tuple[int, int]:
    """(R, S): the frozen-head pass's rows and columns per block (the torch backend's GPU layout)."""
    return gpu_block_sizes(shape.n, shape.vocab, scratch_bytes, shape.hidden)


def atomic_design(shape: Shape, head: str, tile: Tuple[int, int] = (64, 128)) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    bm, bn = tile
    programs = math.ceil(n / bm) * math.ceil(v / bn)
    operands = n * h * e + v * h * e
    backward_flops = (6 if head == "trainable" else 4) * n * h * v
    atomic_bytes = FP32 * n * h * math.ceil(v / bn)  # d_hidden: every vocabulary tile adds its share
    if head == "trainable":
        atomic_bytes += FP32 * v * h * math.ceil(n / bm)  # d_weight: every row tile adds its share
    return [
        Launch("forward: GEMM + online log-sum-exp", math.ceil(n / bm), 2 * n * h * v, operands, tile=tile),
        Launch("backward: recompute + dz + atomic d_hidden" + (", d_weight" if head == "trainable" else ""),
               programs, backward_flops, operands, atomic_bytes, tile=tile),
    ]


def slab_design(shape: Shape, head: str, scratch_bytes: int, tile: Tuple[int, int] = (128, 128)) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    if head == "frozen":
        rows, columns = frozen_blocks(shape, scratch_bytes)
        row_blocks, slabs = math.ceil(n / rows), math.ceil(v / columns)
        blocks = row_blocks * slabs
        weight_reads = row_blocks * v * h * e  # every row block streams the whole weight
        return [
            Launch("forward, per block: z = h W_s^T, float32 out (cuBLAS)", blocks, 2 * n * h * v,
                   slabs * n * h * e + weight_reads + n * v * FP32),
            # max, subtract + exp in place, the target's entry, sum, the cast to bf16
            Launch("forward, per block: running max and sum, p~ = exp(z - m) (elementwise)", 5 * blocks, 0.0,
                   n * v * (6 * FP32 + e)),
            Launch("forward, per block: u = u alpha + p~ W_s (cuBLAS, float32 out)", blocks, 2 * n * h * v,
                   n * v * e + weight_reads + slabs * 4 * n * h * FP32),
            Launch("forward, per row block: u saved in the inputs' dtype", row_blocks, 0.0, n * h * (3 * FP32 + e)),
            Launch("backward: d_hidden = g u", row_blocks, n * h, 2 * n * h * e),
        ]
    width = slab_width(shape, scratch_bytes)
    slabs = math.ceil(v / width)
    pair_bytes = e + (2 if e < FP32 else 0)  # d_hidden, and its bf16 remainder for half precision
    return [
        Launch("forward: GEMM + online log-sum-exp (fused)", math.ceil(n / tile[0]), 2 * n * h * v,
               n * h * e + v * h * e, tile=tile),
        Launch("backward, per slab: recompute z_s + dz epilogue into bf16 scratch (fused)", slabs, 2 * n * h * v,
               slabs * n * h * e + v * h * e + n * v * e, tile=tile),
        Launch("backward, per slab: d_weight_s = dz^T h (cuBLAS, K = N, written once)", slabs, 2 * n * h * v,
               n * v * e + slabs * n * h * e + v * h * e),
        Launch("backward, per slab: d_hidden += dz W_s (Triton GEMM, epilogue adds into the bf16 pair)", slabs,
               2 * n * h * v, n * v * e + v * h * e + slabs * 2 * n * h * pair_bytes, tile=tile),
    ]


def cuda_slab_width(shape: Shape, scratch_bytes: int) -> int:
    """The CUDA backend's slab: float32 logits plus dz in the operands' dtype per element."""
    return slab_columns(shape.n, shape.vocab, FP32 + shape.element_bytes, scratch_bytes)


def cuda_design(shape: Shape, head: str, scratch_bytes: int) -> List[Launch]:
    if head == "frozen":
        return slab_design(shape, head, scratch_bytes)
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    width = cuda_slab_width(shape, scratch_bytes)
    slabs = math.ceil(v / width)
    logits_bytes = slabs * n * h * e + v * h * e + n * v * FP32
    launches = [
        Launch("forward, per slab: x_s = h W_s^T, float32 out (cuBLAS)", slabs, 2 * n * h * v, logits_bytes),
        Launch("forward, per slab: bias + online softmax (slab_softmax_kernel)", slabs, 0.0, n * v * FP32),
        Launch("backward, per slab: x_s recomputed (cuBLAS)", slabs, 2 * n * h * v, logits_bytes),
        Launch("backward, per slab: dz into the scratch (slab_logit_gradient_kernel)", slabs, 0.0, n * v * (FP32 + e)),
        Launch("backward, per slab: d_weight_s = dz^T h (cuBLAS, K = N, written once)", slabs, 2 * n * h * v,
               n * v * e + slabs * n * h * e + v * h * e),
    ]
    if e == FP32:
        return launches + [Launch("backward, per slab: d_hidden += dz W_s (cuBLAS, float32)", slabs, 2 * n * h * v,
                                  n * v * e + v * h * e + slabs * 2 * n * h * FP32)]
    chunks = math.ceil(n / min(n, max(n * width, h) // h))  # product chunks of rows over the logits slab
    return launches + [
        Launch("backward, per row chunk: p = dz W_s (cuBLAS, float32 out)", slabs * chunks, 2 * n * h * v,
               n * v * e + chunks * v * h * e + slabs * n * h * FP32),
        # reads p, hi and lo (bf16), writes hi and lo
        Launch("backward, per row chunk: hi, lo += p (compensated_accumulate_kernel)", slabs * chunks, 0.0,
               slabs * n * h * (FP32 + 2 * e + 2 * 2)),
    ]


def cuda_extra_bytes(shape: Shape, head: str, scratch_bytes: int) -> int:
    """Memory the CUDA design holds beyond its inputs and the gradients it returns: its slab
    scratch and, for half-precision operands, the bfloat16 compensation lo [N, H]."""
    if head == "frozen":
        return slab_extra_bytes(shape, head, scratch_bytes)
    n, h, e = shape.n, shape.hidden, shape.element_bytes
    scratch = max(n * cuda_slab_width(shape, scratch_bytes), h) * FP32 + n * cuda_slab_width(shape, scratch_bytes) * e
    return scratch + (n * h * 2 if e < FP32 else 0)


def slab_extra_bytes(shape: Shape, head: str, scratch_bytes: int) -> int:
    """Memory the slab design holds beyond its inputs and the gradients it returns.

    Trainable head: the [N, Vs] logit-gradient scratch and, for half precision, d_hidden's bf16
    remainder [N, H]. Frozen head: u saved in the inputs' dtype [N, H] and, while the forward
    runs, one block's allocations (within the scratch budget)."""
    n, h, e = shape.n, shape.hidden, shape.element_bytes
    if head == "frozen":
        rows, columns = frozen_blocks(shape, scratch_bytes)
        return n * h * e + rows * h * 4 * FP32 + rows * columns * (FP32 + 2)
    return n * slab_width(shape, scratch_bytes) * e + (2 * n * h if e < FP32 else 0)


def materialized_extra_bytes(shape: Shape) -> int:
    """The materialized baseline's logits (bf16), their float32 log-softmax, and its gradient."""
    return shape.n * shape.vocab * (shape.element_bytes + FP32 + FP32)


@dataclass
class Plan:
    shape: Shape
    head: str
    design: str
    device: DeviceKind
    launches: List[Launch]

    @property
    def predicted_ms(self) -> Tuple[float, float]:
        times = [launch.predicted_ms(self.device, self.shape.element_bytes) for launch in self.launches]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    @property
    def floor_ms(self) -> float:
        return flop_floor(self.shape, self.head) / (self.device.matmul_tflops * 1e12) * 1e3

    @property
    def share_of_peak(self) -> Tuple[float, float]:
        """(at the fast end, at the slow end) of the floor over the predicted time."""
        fast, slow = self.predicted_ms
        return self.floor_ms / fast, self.floor_ms / slow


def plan(shape: Shape, head: str, design: str, device_kind: str, scratch_bytes: int = DEFAULT_SCRATCH_BYTES) -> Plan:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"device kind must be one of {sorted(DEVICE_KINDS)}, got {device_kind!r}")
    if design == "atomic":
        launches = atomic_design(shape, head)
    elif design == "slab":
        launches = slab_design(shape, head, scratch_bytes)
    elif design == "cuda":
        launches = cuda_design(shape, head, scratch_bytes)
    else:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    return Plan(shape, head, design, DEVICE_KINDS[device_kind], launches)


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f}"


def format_plan(result: Plan) -> str:
    e = result.shape.element_bytes
    rows = []
    for launch in result.launches:
        fast, slow = launch.predicted_ms(result.device, e)
        rows.append([launch.name, f"{launch.count:,}", f"{launch.flops / 1e12:,.1f}", _gb(launch.hbm_bytes),
                     _gb(launch.atomic_bytes), f"{fast:,.1f}-{slow:,.1f}"])
    fast, slow = result.predicted_ms
    share_fast, share_slow = result.share_of_peak
    floor = "8NHV" if result.head == "trainable" else "4NHV"
    rows.append(["total", "", f"{sum(l.flops for l in result.launches) / 1e12:,.1f}",
                 _gb(sum(l.hbm_bytes for l in result.launches)), _gb(sum(l.atomic_bytes for l in result.launches)),
                 f"{fast:,.1f}-{slow:,.1f}"])
    shape = result.shape
    return "\n".join([
        f"## {result.design} design, {result.head} head, {result.device.name} (model estimate)", "",
        f"N={shape.n:,} H={shape.hidden:,} V={shape.vocab:,}, {e}-byte operands; {floor} floor "
        f"{flop_floor(shape, result.head) / 1e12:,.1f} TFLOP = {result.floor_ms:.1f} ms at "
        f"{result.device.matmul_tflops:.0f} TFLOP/s; predicted {fast:.0f}-{slow:.0f} ms = "
        f"{100 * share_slow:.0f}-{100 * share_fast:.0f}% of the matmul peak", "",
        markdown_table(["launch", "count", "TFLOP", "HBM GB", "atomic GB", "predicted ms"], rows), ""])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=16384, help="scored tokens N (default: 16384)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size H (default: 4096)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (default: 128256)")
    parser.add_argument("--element-bytes", type=int, choices=(2, 4), default=2,
                        help="bytes per operand element: 2 for bf16/fp16 (default), 4 for fp32")
    parser.add_argument("--device-kind", choices=sorted(DEVICE_KINDS), default="h100",
                        help="GPU kind whose rates the model uses (default: h100)")
    parser.add_argument("--head", nargs="+", choices=HEADS, default=list(HEADS), help="heads (default: both)")
    parser.add_argument("--design", nargs="+", choices=DESIGNS, default=list(DESIGNS),
                        help="designs (default: both)")
    parser.add_argument("--scratch-mib", type=int, default=DEFAULT_SCRATCH_BYTES >> 20,
                        help="the slab design's scratch budget in MiB (default: fastpref's, "
                             f"{DEFAULT_SCRATCH_BYTES >> 20})")


def run(args: argparse.Namespace) -> int:
    for name in ("tokens", "hidden", "vocab", "scratch_mib"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shape = Shape(args.tokens, args.hidden, args.vocab, args.element_bytes)
    device = DEVICE_KINDS[args.device_kind]
    print(f"# LM-head cost model on {device.name}: predictions from FLOPs, bytes and atomics, not measurements\n")
    print(f"- rates assumed: matmul {device.matmul_tflops:.0f} TFLOP/s, HBM {device.hbm_tb_s} TB/s, L2 -> SM "
          f"{device.l2_tb_s[0]}-{device.l2_tb_s[1]} TB/s, float32 atomics {device.atomic_tb_s[0]}-"
          f"{device.atomic_tb_s[1]} TB/s\n")
    for design in args.design:
        for head in args.head:
            print(format_plan(plan(shape, head, design, args.device_kind, args.scratch_mib << 20)))
    baseline = materialized_extra_bytes(shape)
    extra_bytes = {"slab": slab_extra_bytes, "cuda": cuda_extra_bytes}
    for design in (d for d in args.design if d in extra_bytes):
        for head in args.head:
            extra = extra_bytes[design](shape, head, args.scratch_mib << 20)
            print(f"{design} design, {head} head: extra memory {extra / 2**20:,.0f} MiB = "
                  f"{100 * extra / baseline:.2f}% of the materialized baseline's {baseline / 2**30:,.1f} GiB "
                  "of logits, log-softmax and logit gradient")
    return 0
