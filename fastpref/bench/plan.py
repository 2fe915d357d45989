"""Cost model of the LM-head step: every kernel and GEMM a design launches, and its predicted time.

For a shape (N scored tokens, H, V), a dtype width, a head (trainable or frozen) and a GPU kind,
each launch is counted in FLOPs, HBM bytes, atomic bytes and the logits its epilogue handles,
and its time is predicted as

    max(compute, HBM traffic, atomic traffic) + serialised epilogue

    compute      FLOPs / (rate x wave efficiency). rate is the matmul rate (what cuBLAS GEMMs and
                 persistent warp-specialised TMA kernels sustain), except for a tile kernel that
                 loads its own operands (no TMA multicast across a cluster), which is also capped
                 by its operand intensity x the L2 -> SM bandwidth: a BM x BN tile walking K loads
                 (BM + BN) K elements for 2 BM BN K FLOPs (128 x 128 bf16: 64 FLOP/byte,
                 128 x 256: 85). Wave efficiency: a launch of T tiles on S SMs runs ceil(T / S)
                 rounds, the last one partly idle (persistent kernels that keep every SM busy
                 until the end count as 1).
    HBM          bytes / HBM bandwidth (memory traffic overlaps the compute within a launch).
    atomics      bytes of float32 atomics or lock-guarded adds / their read-modify-write rate.
    epilogue     a fused tile kernel that is not warp-specialised runs its softmax epilogue (max,
                 exp, sums, a logit-gradient store) between its tensor-core steps, so the tensor
                 cores wait for it: logits / the device's serialised-epilogue rate. A
                 warp-specialised kernel runs it on other warps, overlapped (no term).

Launches run one after the other: a design's time is the sum. One set of per-device rates serves
every design; ``fastpref plan --calibrate`` checks them against published measurements of the
peers' designs (fastpref.bench.calibration), and docs/cost-model.md explains each rate. These
are model estimates, not measurements: ``fastpref plan`` says so, and the GPU proof run prints
the measured rows beside them.

Designs:
  slab        the Triton backend. Trainable head: the fused forward (GEMM + online log-sum-exp,
              128 x 128 tiles, row blocks x vocabulary splits as programs), then per vocabulary
              slab of all N rows (width Vs from the scratch budget) a fused recompute + dz
              epilogue into a bf16 scratch, d_weight_s = dz^T h (cuBLAS, written once) and
              d_hidden += dz W_s (a Triton GEMM whose epilogue adds into a bf16 pair): 8NHV, no
              atomics. Its fused kernels are not warp-specialised (on sm_90 in half precision they
              run persistent and TMA-fed, kernels/persistent_*.py): they pay the serialised
              epilogue and their 128 x 128 tiles' L2 cap. Frozen head: the torch backend's pass,
              in blocks of R rows x S columns that fit the scratch budget: z = h W_s^T in float32
              and u <- u alpha + p~ W_s (cuBLAS) with the running max and sum taken between them,
              so the backward is d_hidden = g u: 4NHV, but many small launches from Python (about
              a dozen per block) and float32 round trips through memory.
  cuda        the CUDA backend (no Triton): the slab algorithm with every matmul a cuBLAS GEMM and
              the csrc/ epilogues between them, slabs of float32 logits plus a dz scratch.
              Trainable head: per slab x_s = h W_s^T (float32 out), the online-softmax epilogue;
              in the backward x_s again, the dz epilogue, d_weight_s = dz^T h, and d_hidden from
              float32 products in row chunks (over the dead logits slab) folded into hi + lo (half
              precision) by the compensated accumulation: 8NHV, no atomics. Frozen head: the
              torch backend's slab pass, as in the slab design.
  persistent  a design, argued from what the calibrated model charges, of which two kernels
              exist without its warp specialisation: GEMM C (kernels/persistent_logit_gradient.py)
              and GEMM A's statistics without the p~ store (kernels/persistent_forward.py), the
              Triton backend's sm_90 half-precision kernels: persistent, TMA-fed, 128 x 128
              tiles, no cluster multicast. Triton 3.9 does not warp-specialise sm_90 loops, so
              they still serialise their epilogues: the slab design, not this one, models them.
              GEMM B, GEMM D as a persistent kernel, the interleaved tile stream and the
              warp-specialised, multicast forms are on paper; no GPU has run any of it. The design:
              every FLOP in persistent, warp-specialised, TMA-fed GEMMs whose epilogues overlap
              the next tile's mainloop (no serialised epilogue, no L2 cap: 128 x 256 tiles in
              2-CTA clusters that multicast the shared operand), and no accumulation of d_hidden
              or d_weight across slabs at all.
              Forward (both heads), per block of R rows and per forward slab of Vf columns:
                A. z = h_R W_s^T; the epilogue keeps, per row and 256-column tile, the tile's max
                   m_tile and sum of exp and the target logit, and stores p~ = exp(z - m_tile)
                   (at most 1) in the operands' dtype into a [R, Vf] scratch.
                B. u_R = u_R exp(m_old - m_new) + p W_s with p = p~ exp(m_tile - m_new): the
                   producer reads the slab's tile maxima of its rows (m_new, and the running sum
                   l), the consumer warp groups scale each 256-column block of p~ in registers and
                   issue wgmma with that operand from registers (as CUTLASS's mixed-input GEMMs
                   do), and the epilogue rescales and adds u_R, float32 [R, H], through TMA.
                After the last slab u = W_t - u_R / l is saved in the operands' dtype: the torch
                backend's u_n = W_{t_n} - sum_v p_{n,v} W_v, in two persistent GEMMs (4NHV).
                p~ never needs a pass of its own: A writes it, B reads it as its operand.
              Frozen backward: d_hidden = g u. Trainable backward, per backward slab of Vb columns
              and all N rows: C. z_s recomputed with the dz = g (onehot - p) epilogue into a
              [N, Vb] scratch, D. d_weight_s = dz^T h (K = N: written once, no reduce-add).
              d_hidden = g u again: the backward never accumulates d_hidden over slabs.
              Each pass is one persistent kernel whose tile stream interleaves A and B (C and D) of
              consecutive slabs: a B (D) tile waits only on a counter of the A (C) tiles it reads,
              and p~ and dz are double-buffered, so no SM idles at a slab boundary (the model gives
              these launches no wave tail).
              8NHV trainable, 4NHV frozen. The peers pay instead a wave tail at every grid-wide
              barrier (Liger's three phases per 1,024-token wave), an accumulation of d_weight
              across chunks (Liger's per-wave bf16 reduce-add, PyTorch's and TRL's per-chunk
              read-modify-write) or of d_hidden across slabs (the slab designs' pair), or memory
              passes between their GEMMs.
              Memory: u [N, H] in the operands' dtype plus the larger of the forward block
              (u_R float32, two p~ buffers, per-tile statistics) and the backward's two dz
              buffers, both sized from the scratch budget.
  groups      the preference loss with its gradients in the forward on the CUDA backend
              (fastpref.head_loss, PreferenceLoss(gradients_in_forward=True)): a trade of memory
              for time that the other designs do not make. Trainable head, per group of R whole
              pairs' rows (R = head_loss.GPU_GROUP_ROWS, 2,048): x = h_R W^T (cuBLAS, float32
              into a [R, V] store), the online-softmax epilogue, the pair loss's gradient g of the
              group, the dz epilogue from the stored x, d_weight += dz^T h_R (cuBLAS adding into a
              float32 [V, H], K = R) and d_hidden_R = dz W (cuBLAS, K = V, written once): 6NHV, as
              the chunked peers (Liger, QuACK) for cross-entropy, every FLOP in cuBLAS. The
              epilogues (one warp per row) see each row of the store as k segments of V / k
              columns, R k = 16,384 rows, so that they stream at the memory's speed as the cuda
              design's slabs of all N rows do (with a bias they get R rows: not modelled). Memory:
              the store and dz ([R, V] float32 and in the operands' dtype) and, with more than one
              group, the float32 weight gradient. Frozen head: the cuda design's.
"""
from __future__ import annotations

import argparse
import math
import sys
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..backends.scratch import DEFAULT_SCRATCH_BYTES, slab_columns
from ..backends.torch_backend import gpu_block_sizes
from ..head_loss import GPU_GROUP_ROWS
from ..train import memory_plan
from .report import markdown_table

HEADS = ("trainable", "frozen")
DESIGNS = ("slab", "cuda", "persistent", "groups")
# designs no kernel of fastpref runs yet: their predictions are of a design on paper
ON_PAPER = frozenset({"persistent"})


def design_title(design: str) -> str:
    """A design's name as the reports print it, a design on paper labelled so."""
    return f"{design} (a design on paper, not built)" if design in ON_PAPER else design
FP32 = 4
# The persistent design's GEMM tile: 128 x 256 per CTA, the shared operand multicast to a 2-CTA
# cluster. Its forward keeps a float32 max and sum per row and 256-column tile of logits.
PERSISTENT_TILE_COLUMNS = 256
PERSISTENT_TILE_STATISTICS = 2 * 4
# The Triton backend's half-precision tile on sm_80/sm_90 (fastpref.backends.triton_backend).
TRITON_TILE = (128, 128)


@dataclass(frozen=True)
class DeviceKind:
    """Per-device rates, one set for every design (see docs/cost-model.md for where each comes from).

    matmul_tflops: what large cuBLAS GEMMs and persistent warp-specialised kernels sustain (not the
    datasheet peak). serial_epilogue_glogits_s: logits per second a non-warp-specialised fused
    kernel's softmax epilogue costs while the tensor cores wait; None where no published figure
    shows such a cost (on Ampere, CCE's Triton forward runs within 20% of the matmul rate)."""

    name: str
    sms: int
    matmul_tflops: float
    hbm_tb_s: float
    l2_tb_s: float
    atomic_tb_s: float
    serial_epilogue_glogits_s: Optional[float]


DEVICE_KINDS = {
    "h100": DeviceKind("H100 SXM", 132, 750.0, 3.35, 7.5, 1.8, 70.0),
    "h200": DeviceKind("H200", 132, 750.0, 4.8, 7.5, 1.8, 70.0),
    "a100": DeviceKind("A100 SXM", 108, 270.0, 2.0, 4.5, 1.0, None),
}


@dataclass(frozen=True)
class Shape:
    n: int
    hidden: int
    vocab: int
    element_bytes: int = 2  # bf16

    def __post_init__(self):
        for name in ("n", "hidden", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.element_bytes not in (2, 4):
            raise ValueError(f"element_bytes must be 2 or 4, got {self.element_bytes}")

    def describe(self) -> str:
        return f"N={self.n:,} H={self.hidden:,} V={self.vocab:,}"


def operand_intensity(tile: Tuple[int, int], element_bytes: int) -> float:
    """FLOPs per byte of operands a BM x BN tile loads from L2."""
    bm, bn = tile
    return 2 * bm * bn / ((bm + bn) * element_bytes)


def wave_efficiency(tiles: int, sms: int) -> float:
    """Share of the SM-rounds a launch of `tiles` output tiles keeps busy, one tile per SM at a time."""
    return tiles / (math.ceil(tiles / sms) * sms)


@dataclass
class Launch:
    """One kind of launch of a design, `count` times; figures are for all of them together.

    tile: (BM, BN) of a kernel that loads its own operands from L2 (caps its rate); None for
    cuBLAS GEMMs, persistent multicast kernels and memory passes. tiles: output tiles of one
    launch, for its wave efficiency; None when the launch keeps every SM busy to its end.
    epilogue_logits: logits whose softmax epilogue runs serialised with the tensor cores."""

    name: str
    count: int
    flops: float
    hbm_bytes: float
    atomic_bytes: float = 0.0
    tile: Optional[Tuple[int, int]] = None
    tiles: Optional[int] = None
    epilogue_logits: float = 0.0

    def terms_ms(self, device: DeviceKind, element_bytes: int) -> Dict[str, float]:
        """The compute, HBM, atomic and serialised-epilogue times in ms."""
        rate = device.matmul_tflops * 1e12
        if self.tile is not None:
            rate = min(rate, operand_intensity(self.tile, element_bytes) * device.l2_tb_s * 1e12)
        if self.tiles is not None:
            rate *= wave_efficiency(self.tiles, device.sms)
        epilogue = 0.0
        if self.epilogue_logits and device.serial_epilogue_glogits_s is not None:
            epilogue = self.epilogue_logits / (device.serial_epilogue_glogits_s * 1e9)
        return {"compute": self.flops / rate * 1e3, "HBM": self.hbm_bytes / (device.hbm_tb_s * 1e12) * 1e3,
                "atomics": self.atomic_bytes / (device.atomic_tb_s * 1e12) * 1e3, "epilogue": epilogue * 1e3}

    def predicted_ms(self, device: DeviceKind, element_bytes: int) -> float:
        terms = self.terms_ms(device, element_bytes)
        return max(terms["compute"], terms["HBM"], terms["atomics"]) + terms["epilogue"]

    def bound(self, device: DeviceKind, element_bytes: int) -> str:
        """What limits the launch: compute, HBM or atomics, '+ epilogue' when one is serialised."""
        terms = self.terms_ms(device, element_bytes)
        limit = max(("compute", "HBM", "atomics"), key=lambda name: terms[name])
        return limit + (" + epilogue" if terms["epilogue"] else "")


def flop_floor(shape: Shape, head: str) -> float:
    return (8 if head == "trainable" else 4) * shape.n * shape.hidden * shape.vocab


def slab_width(shape: Shape, scratch_bytes: int) -> int:
    """The Triton backward's slab: the widest multiple of its 128-column tile whose [N, Vs]
    scratch fits the budget."""
    return slab_columns(shape.n, shape.vocab, shape.element_bytes, scratch_bytes, TRITON_TILE[1])


def frozen_blocks(shape: Shape, scratch_bytes: int) -> Tuple[int, int]:
    """(R, S): the frozen-head pass's rows and columns per block (the torch backend's GPU layout)."""
    return gpu_block_sizes(shape.n, shape.vocab, scratch_bytes, shape.hidden)


def torch_frozen_pass(shape: Shape, scratch_bytes: int) -> List[Launch]:
    """The torch backend's GPU pass for a frozen head (both GPU backends take it)."""
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
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


def slab_design(shape: Shape, head: str, scratch_bytes: int, device: DeviceKind) -> List[Launch]:
    if head == "frozen":
        return torch_frozen_pass(shape, scratch_bytes)
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    bm, bn = TRITON_TILE
    width = slab_width(shape, scratch_bytes)
    slabs = math.ceil(v / width)
    row_blocks = math.ceil(n / bm)
    # The forward splits V until about two programs per SM run (triton_backend.kernel_config).
    forward_programs = row_blocks * max(1, 2 * device.sms // row_blocks)
    pair_bytes = e + (2 if e < FP32 else 0)  # d_hidden, and its bf16 remainder for half precision
    return [
        Launch("forward: GEMM + online log-sum-exp (fused)", 1, 2 * n * h * v, n * h * e + v * h * e,
               tile=TRITON_TILE, tiles=forward_programs, epilogue_logits=n * v),
        Launch("backward, per slab: recompute z_s + dz epilogue into bf16 scratch (fused)", slabs, 2 * n * h * v,
               slabs * n * h * e + v * h * e + n * v * e, tile=TRITON_TILE,
               tiles=row_blocks * math.ceil(width / bn), epilogue_logits=n * v),
        Launch("backward, per slab: d_weight_s = dz^T h (cuBLAS, K = N, written once)", slabs, 2 * n * h * v,
               n * v * e + slabs * n * h * e + v * h * e),
        Launch("backward, per slab: d_hidden += dz W_s (Triton GEMM, epilogue adds into the bf16 pair)", slabs,
               2 * n * h * v, n * v * e + v * h * e + slabs * 2 * n * h * pair_bytes, tile=TRITON_TILE,
               tiles=row_blocks * math.ceil(h / bn)),
    ]


def cuda_slab_width(shape: Shape, scratch_bytes: int) -> int:
    """The CUDA backend's slab: float32 logits plus dz in the operands' dtype per element."""
    return slab_columns(shape.n, shape.vocab, FP32 + shape.element_bytes, scratch_bytes)


def cuda_design(shape: Shape, head: str, scratch_bytes: int, device: DeviceKind) -> List[Launch]:
    if head == "frozen":
        return torch_frozen_pass(shape, scratch_bytes)
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


def group_count(shape: Shape) -> Tuple[int, int]:
    """(R, G): the groups design's rows per group and number of groups."""
    rows = min(shape.n, GPU_GROUP_ROWS)
    return rows, math.ceil(shape.n / rows)


def groups_design(shape: Shape, head: str, scratch_bytes: int, device: DeviceKind) -> List[Launch]:
    if head == "frozen":
        return torch_frozen_pass(shape, scratch_bytes)
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    rows, groups = group_count(shape)
    # group 0 writes d_weight; the others read and write the float32 accumulator (or, with one
    # group, the weight's dtype)
    weight_gradient_bytes = v * h * e if groups == 1 else (2 * groups - 1) * v * h * FP32
    launches = [
        Launch("per group: h_R gathered, d_hidden_R scattered back", 2 * groups, 0.0, 4 * n * h * e),
        Launch("per group: x = h_R W^T, float32 into the store (cuBLAS)", groups, 2 * n * h * v,
               n * h * e + groups * v * h * e + n * v * FP32),
        Launch("per group: bias + online softmax of the store (slab_softmax_kernel)", groups, 0.0, n * v * FP32),
        Launch("per group: the loss and its gradient g (torch ops by autograd, over all N tokens)", groups, 0.0,
               groups * n * 4 * FP32),
        Launch("per group: dz from the stored x (slab_logit_gradient_kernel)", groups, 0.0, n * v * (FP32 + e)),
        Launch("per group: d_weight += dz^T h_R (cuBLAS, K = R, into float32)", groups, 2 * n * h * v,
               n * v * e + groups * n * h * e + weight_gradient_bytes),
        Launch("per group: d_hidden_R = dz W (cuBLAS, K = V, written once)", groups, 2 * n * h * v,
               n * v * e + groups * v * h * e + n * h * e),
    ]
    if groups > 1 and e < FP32:
        launches.append(Launch("d_weight rounded to the weight's dtype", 1, 0.0, v * h * (FP32 + e)))
    return launches


@dataclass(frozen=True)
class PersistentLayout:
    """The persistent design's blocks: R rows per forward block, Vf forward slab columns, Vb
    backward slab columns, all sized from the scratch budget."""

    rows: int
    forward_columns: int
    backward_columns: int


def persistent_layout(shape: Shape, scratch_bytes: int) -> PersistentLayout:
    """A quarter of the budget holds u_R (float32 [R, H]), the rest two p~ buffers ([R, Vf]) with
    their per-tile statistics; the backward's two dz buffers ([N, Vb]) take the whole budget. R
    is a multiple of the 128-row tile, Vf and Vb of the 256-column tile (at least one tile, at
    most V)."""
    n, h, e = shape.n, shape.hidden, shape.element_bytes
    rows = (scratch_bytes // 4) // (h * FP32) // 128 * 128
    rows = max(128, min(rows, math.ceil(n / 128) * 128))
    tile_bytes = rows * (PERSISTENT_TILE_COLUMNS * e + PERSISTENT_TILE_STATISTICS)
    forward_tiles = max(1, (scratch_bytes - rows * h * FP32) // (2 * tile_bytes))
    forward_columns = min(forward_tiles * PERSISTENT_TILE_COLUMNS, shape.vocab)
    backward_columns = slab_columns(n, shape.vocab, e, scratch_bytes // 2, PERSISTENT_TILE_COLUMNS)
    return PersistentLayout(rows, forward_columns, backward_columns)


def persistent_design(shape: Shape, head: str, scratch_bytes: int, device: DeviceKind) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    layout = persistent_layout(shape, scratch_bytes)
    row_blocks = math.ceil(n / layout.rows)
    forward_slabs = math.ceil(v / layout.forward_columns)
    blocks = row_blocks * forward_slabs
    tile_statistics = n * math.ceil(v / PERSISTENT_TILE_COLUMNS) * PERSISTENT_TILE_STATISTICS
    launches = [
        Launch("forward, per block and slab: z = h_R W_s^T, epilogue: tile max and sum, target logit, "
               "p~ = exp(z - m_tile) into the scratch (persistent warp-specialised GEMM)", blocks, 2 * n * h * v,
               forward_slabs * n * h * e + row_blocks * v * h * e + n * v * e + tile_statistics),
        Launch("forward, per block and slab: u_R = u_R exp(m_old - m_new) + p W_s, p~ rescaled per tile in "
               "registers, u_R float32 through TMA (persistent warp-specialised GEMM)", blocks, 2 * n * h * v,
               n * v * e + tile_statistics + row_blocks * v * h * e + forward_slabs * 2 * n * h * FP32),
        # reads u_R (float32) and the target rows W_t, writes u in the operands' dtype
        Launch("forward, per block: u = W_t - u_R / l saved in the operands' dtype", row_blocks, 2 * n * h,
               n * h * (FP32 + 2 * e)),
    ]
    if head == "trainable":
        backward_slabs = math.ceil(v / layout.backward_columns)
        launches += [
            Launch("backward, per slab: z_s recomputed, dz = g (onehot - p) into the scratch "
                   "(persistent warp-specialised GEMM)", backward_slabs, 2 * n * h * v,
                   backward_slabs * n * h * e + v * h * e + n * v * e),
            Launch("backward, per slab: d_weight_s = dz^T h (persistent GEMM, K = N, written once)", backward_slabs,
                   2 * n * h * v, n * v * e + backward_slabs * n * h * e + v * h * e),
        ]
    return launches + [Launch("backward: d_hidden = g u", 1, n * h, 2 * n * h * e)]


# What the per-token outputs (outputs=), the soft cap and the entropy's gradient add, per design.
# Fused Triton kernels pay their serialised epilogue per operation: the extra per-logit operations
# of each option, counted from kernels/ (not calibrated: no peer publishes a figure with them),
# scale it against the plain epilogue's own count. The CUDA epilogues read float32 logits from
# memory and stay bound by that read however many operations they add. The torch pass (the
# frozen head of both GPU backends) pays each option as elementwise passes over its float32
# blocks, counted in bytes per logit.
FORWARD_EPILOGUE_OPS = 6  # max, subtract, exp, the target's compare and select, add
BACKWARD_EPILOGUE_OPS = 5  # subtract, exp, the target's compare and select, multiply
OPTION_FORWARD_OPS = {"entropy": 5, "log_sum_sq_probs": 2, "mean_logits": 2, "is_top1": 3, "softcap": 10}
OPTION_BACKWARD_OPS = {"entropy_gradient": 6, "softcap": 14}
OPTION_TORCH_PASS_BYTES = {"entropy": 24, "log_sum_sq_probs": 8, "mean_logits": 4, "is_top1": 14, "softcap": 24}
HEAD_OPTIONS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "softcap", "entropy_gradient")
# Rows per tile of the Triton kernels whose epilogue carries the outputs' sums (forward) or the
# entropy's gradient term (backward): the full 128-row tile spills (triton_backend.kernel_config).
TRITON_WIDE_EPILOGUE_TILE = (64, 128)


def with_head_options(launches: List[Launch], design: str, shape: Shape, head: str,
                      options: Sequence[str]) -> List[Launch]:
    """`launches` of `design` with the head options applied: the per-token outputs among `options`,
    "softcap" and "entropy_gradient" (the entropy in the loss). A frozen head with the entropy's
    gradient is not folded: it takes the trainable head's passes less d_weight (see plan)."""
    options = set(options)
    unknown = options - set(HEAD_OPTIONS)
    if unknown:
        raise ValueError(f"head options must be among {HEAD_OPTIONS}, got {sorted(unknown)}")
    n, v = shape.n, shape.vocab
    outputs = options - {"softcap", "entropy_gradient"}
    changed = []
    for launch in launches:
        launch = Launch(**vars(launch))
        if launch.name.startswith("forward, per block: running max and sum"):  # the torch pass
            launch.hbm_bytes += n * v * sum(OPTION_TORCH_PASS_BYTES[o] for o in options if o in OPTION_TORCH_PASS_BYTES)
        elif design == "slab" and launch.name.startswith("forward: GEMM"):
            ops = sum(OPTION_FORWARD_OPS[o] for o in options if o in OPTION_FORWARD_OPS)
            launch.epilogue_logits *= (FORWARD_EPILOGUE_OPS + ops) / FORWARD_EPILOGUE_OPS
            if outputs:
                launch.tile = TRITON_WIDE_EPILOGUE_TILE
                launch.tiles = launch.tiles * 2
        elif design == "slab" and launch.name.startswith("backward, per slab: recompute"):
            ops = sum(OPTION_BACKWARD_OPS[o] for o in options if o in OPTION_BACKWARD_OPS)
            launch.epilogue_logits *= (BACKWARD_EPILOGUE_OPS + ops) / BACKWARD_EPILOGUE_OPS
            if "entropy_gradient" in options:
                launch.tile = TRITON_WIDE_EPILOGUE_TILE
                launch.tiles = launch.tiles * 2
        changed.append(launch)
    return changed


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


def persistent_extra_bytes(shape: Shape, head: str, scratch_bytes: int) -> int:
    """Memory the persistent design holds beyond its inputs and the gradients it returns: u [N, H]
    in the operands' dtype from the forward to the backward, plus the larger of the forward block
    (u_R float32, two p~ buffers with their per-tile statistics) and, for a trainable head, the
    two dz buffers."""
    n, h, e = shape.n, shape.hidden, shape.element_bytes
    layout = persistent_layout(shape, scratch_bytes)
    forward_block = layout.rows * (h * FP32 + 2 * layout.forward_columns * e
                                   + 2 * math.ceil(layout.forward_columns / PERSISTENT_TILE_COLUMNS)
                                   * PERSISTENT_TILE_STATISTICS)
    backward_scratch = 2 * n * layout.backward_columns * e if head == "trainable" else 0
    return n * h * e + max(forward_block, backward_scratch)


def groups_extra_bytes(shape: Shape, head: str, scratch_bytes: int) -> int:
    """Memory the groups design holds beyond its inputs and the gradients it returns: the [R, V]
    store (float32) and dz (operands' dtype), h_R and d_hidden_R, and with more than one group of
    half-precision operands the float32 weight gradient."""
    if head == "frozen":
        return slab_extra_bytes(shape, head, scratch_bytes)
    h, v, e = shape.hidden, shape.vocab, shape.element_bytes
    rows, groups = group_count(shape)
    return rows * v * (FP32 + e) + 2 * rows * h * e + (v * h * FP32 if groups > 1 and e < FP32 else 0)


def materialized_extra_bytes(shape: Shape) -> int:
    """The materialized baseline's logits (bf16), their float32 log-softmax, and its gradient."""
    return shape.n * shape.vocab * (shape.element_bytes + FP32 + FP32)


DesignFunction = Callable[[Shape, str, int, DeviceKind], List[Launch]]
DESIGN_FUNCTIONS: Dict[str, DesignFunction] = {"slab": slab_design, "cuda": cuda_design,
                                               "persistent": persistent_design, "groups": groups_design}
EXTRA_BYTES = {"slab": slab_extra_bytes, "cuda": cuda_extra_bytes, "persistent": persistent_extra_bytes,
               "groups": groups_extra_bytes}
# Designs modelled for the log-probs alone, without the head options.
PLAIN_DESIGNS = ("persistent", "groups")


@dataclass
class Plan:
    shape: Shape
    head: str
    design: str
    device: DeviceKind
    launches: List[Launch]

    @property
    def predicted_ms(self) -> float:
        return sum(launch.predicted_ms(self.device, self.shape.element_bytes) for launch in self.launches)

    @property
    def floor_ms(self) -> float:
        return flop_floor(self.shape, self.head) / (self.device.matmul_tflops * 1e12) * 1e3

    @property
    def share_of_peak(self) -> float:
        """The FLOP floor at the matmul rate over the predicted time."""
        return self.floor_ms / self.predicted_ms


def device_kind(name: str) -> DeviceKind:
    if name not in DEVICE_KINDS:
        raise ValueError(f"device kind must be one of {sorted(DEVICE_KINDS)}, got {name!r}")
    return DEVICE_KINDS[name]


def plan(shape: Shape, head: str, design: str, device_kind_name: str,
         scratch_bytes: int = DEFAULT_SCRATCH_BYTES, options: Sequence[str] = (), folded: bool = True) -> Plan:
    """The launches of `design` for `head`, with the head options (with_head_options) applied. The
    persistent design is on paper for the log-probs alone: no options there. folded=False: a frozen
    head whose hidden gradient is not folded into the forward (a sharded head's)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    device = device_kind(device_kind_name)
    if design not in DESIGN_FUNCTIONS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if scratch_bytes < 1:
        raise ValueError(f"scratch_bytes must be >= 1, got {scratch_bytes}")
    if options and design in PLAIN_DESIGNS:
        raise ValueError(f"the {design} design is modelled for the log-probs alone: no head options")
    if head == "frozen" and ("entropy_gradient" in options or not folded) and design not in PLAIN_DESIGNS:
        # not folded: the trainable head's passes, less d_weight
        launches = [launch for launch in DESIGN_FUNCTIONS[design](shape, "trainable", scratch_bytes, device)
                    if "d_weight" not in launch.name]
    else:
        launches = DESIGN_FUNCTIONS[design](shape, head, scratch_bytes, device)
    return Plan(shape, head, design, device, with_head_options(launches, design, shape, head, options))


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f}"


def launch_table(launches: List[Launch], device: DeviceKind, element_bytes: int) -> str:
    rows = [[launch.name, f"{launch.count:,}", f"{launch.flops / 1e12:,.1f}", _gb(launch.hbm_bytes),
             _gb(launch.atomic_bytes), launch.bound(device, element_bytes),
             f"{launch.predicted_ms(device, element_bytes):,.1f}"] for launch in launches]
    rows.append(["total", "", f"{sum(l.flops for l in launches) / 1e12:,.1f}",
                 _gb(sum(l.hbm_bytes for l in launches)), _gb(sum(l.atomic_bytes for l in launches)), "",
                 f"{sum(l.predicted_ms(device, element_bytes) for l in launches):,.1f}"])
    return markdown_table(["launch", "count", "TFLOP", "HBM GB", "atomic GB", "bound by", "predicted ms"], rows)


def format_plan(result: Plan) -> str:
    shape = result.shape
    floor = "8NHV" if result.head == "trainable" else "4NHV"
    flops = sum(launch.flops for launch in result.launches)
    fewer = ""
    if flops < 0.99 * flop_floor(shape, result.head):  # keeps logits rather than recomputing them
        fewer = f" (its GEMMs do {flops / (shape.n * shape.hidden * shape.vocab):.0f}NHV: over that, " \
                f"{100 * flops / (result.device.matmul_tflops * 1e9 * result.predicted_ms):.0f}%)"
    return "\n".join([
        f"## {design_title(result.design)} design, {result.head} head, {result.device.name} (model estimate)", "",
        f"{shape.describe()}, {shape.element_bytes}-byte operands; {floor} floor "
        f"{flop_floor(shape, result.head) / 1e12:,.1f} TFLOP = {result.floor_ms:.1f} ms at "
        f"{result.device.matmul_tflops:.0f} TFLOP/s; predicted {result.predicted_ms:.1f} ms = "
        f"{100 * result.share_of_peak:.0f}% of the matmul rate over {floor}{fewer}", "",
        launch_table(result.launches, result.device, shape.element_bytes), ""])


def options_table(shape: Shape, designs: Sequence[str], heads: Sequence[str], device_kind_name: str,
                  scratch_bytes: int, options: Sequence[str]) -> str:
    """Each head option's predicted cost alone, and all of them together, over the plain op."""
    rows = []
    for design in designs:
        for head in heads:
            plain = plan(shape, head, design, device_kind_name, scratch_bytes).predicted_ms
            for chosen in [(option,) for option in options] + ([tuple(options)] if len(options) > 1 else []):
                ms = plan(shape, head, design, device_kind_name, scratch_bytes, chosen).predicted_ms
                rows.append([design, head, " + ".join(chosen), f"{plain:,.1f}", f"{ms:,.1f}", f"{ms - plain:+,.1f}",
                             f"{100 * (ms / plain - 1):+.0f}%"])
    return "\n".join(["## The head options' predicted cost (model estimate)", "",
                      markdown_table(["design", "head", "options", "plain ms", "with them ms", "added ms", "added"],
                                     rows), ""])


def rates_line(device: DeviceKind) -> str:
    epilogue = ("none" if device.serial_epilogue_glogits_s is None
                else f"{device.serial_epilogue_glogits_s:.0f} G logits/s")
    return (f"{device.name}: matmul {device.matmul_tflops:.0f} TFLOP/s, HBM {device.hbm_tb_s} TB/s, L2 -> SM "
            f"{device.l2_tb_s} TB/s, atomics {device.atomic_tb_s} TB/s, serialised epilogue {epilogue}, "
            f"{device.sms} SMs")


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
                        help="designs (default: all)")
    parser.add_argument("--scratch-mib", type=int, default=DEFAULT_SCRATCH_BYTES >> 20,
                        help="the designs' scratch budget in MiB (default: fastpref's, "
                             f"{DEFAULT_SCRATCH_BYTES >> 20})")
    parser.add_argument("--options", nargs="+", choices=HEAD_OPTIONS, default=[], metavar="OPTION",
                        help="head options to model: per-token outputs (entropy, log_sum_sq_probs, mean_logits, "
                             "is_top1), softcap, entropy_gradient (the entropy in the loss); with them the report "
                             "ends with each option's predicted cost alone (slab and cuda designs)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="K",
                        help="also the head sharded on the vocabulary over K processes (--parallel tp): each "
                             "process's compute on V / K, and the collectives' bytes and predicted NVLink time")
    parser.add_argument("--responses-per-prompt", type=int, default=2, metavar="K",
                        help="the N scored tokens are K responses per prompt, every pair among them trained "
                             "(fastpref train --group-by-prompt, --pair-selection margin): each response scored once "
                             "against (K - 1) N tokens for the same pairs one by one; the report ends with both")
    memory_plan.add_arguments(parser)
    parser.add_argument("--calibrate", action="store_true",
                        help="instead, the model against published measurements of the peers' designs "
                             "(every rate, every figure, predicted / published)")


def run(args: argparse.Namespace) -> int:
    if args.memory is not None:
        try:
            return memory_plan.run(args)
        except (ValueError, OSError) as error:
            print(f"fastpref plan: error: {error}", file=sys.stderr)
            return 2
    given = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is not None]
    if given:
        print(f"fastpref plan: error: {' and '.join(given)} {'are' if len(given) > 1 else 'is'} read by the memory "
              "plan: give --memory SIZE too (fastpref plan --memory 24GiB --model ...)", file=sys.stderr)
        return 2
    if args.calibrate:
        from .calibration import format_calibration

        print(format_calibration())
        return 0
    if not 1 <= args.tensor_parallel <= args.vocab:
        raise SystemExit(f"--tensor-parallel must be in [1, --vocab {args.vocab}], got {args.tensor_parallel}")
    if args.responses_per_prompt < 2:
        raise SystemExit(f"--responses-per-prompt must be >= 2 (a pair), got {args.responses_per_prompt}")
    for name in ("tokens", "hidden", "vocab", "scratch_mib"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shape = Shape(args.tokens, args.hidden, args.vocab, args.element_bytes)
    device = DEVICE_KINDS[args.device_kind]
    print(f"# LM-head cost model on {device.name}: predictions from FLOPs, bytes, tiles and atomics, "
          "not measurements\n")
    print(f"- rates assumed (calibrated: `fastpref plan --calibrate`): {rates_line(device)}\n")
    budget = args.scratch_mib << 20
    designs = [d for d in args.design if not (args.options and d in PLAIN_DESIGNS)]
    for design in designs:
        for head in args.head:
            print(format_plan(plan(shape, head, design, args.device_kind, budget, args.options)))
    if args.options:
        print(options_table(shape, designs, args.head, args.device_kind, budget, args.options))
    if args.tensor_parallel > 1 and set(designs) & set(SHARDED_DESIGNS):
        print(vocab_parallel_table(shape, args.tensor_parallel, designs, args.head, args.device_kind, budget,
                                   args.options))
    if args.responses_per_prompt > 2:
        print(group_table(shape, args.responses_per_prompt, designs, args.head, args.device_kind, budget))
    baseline = materialized_extra_bytes(shape)
    for design in args.design:
        for head in args.head:
            extra = EXTRA_BYTES[design](shape, head, args.scratch_mib << 20)
            print(f"{design_title(design)} design, {head} head: extra memory {extra / 2**20:,.0f} MiB = "
                  f"{100 * extra / baseline:.2f}% of the materialized baseline's {baseline / 2**30:,.1f} GiB "
                  "of logits, log-softmax and logit gradient")
    return 0


def group_table(shape: Shape, responses: int, designs: Sequence[str], heads: Sequence[str], device_kind_name: str,
                scratch_bytes: int) -> str:
    """The head's predicted time for N scored tokens of K-response groups (each response once, every
    pair among them reading its log-prob) against the same K(K-1)/2 pairs per prompt packed one by
    one, where each response is scored in each of its K - 1 pairs: (K - 1) N tokens."""
    unshared = dataclasses.replace(shape, n=(responses - 1) * shape.n)
    rows = []
    for design in designs:
        for head in heads:
            grouped, one_by_one = (plan(s, head, design, device_kind_name, scratch_bytes) for s in (shape, unshared))
            rows.append([design_title(design), head, f"{grouped.predicted_ms:,.1f}", f"{one_by_one.predicted_ms:,.1f}",
                         f"{one_by_one.predicted_ms / grouped.predicted_ms:.2f}x"])
    return "\n".join([
        f"## {responses} responses per prompt, every pair among them (model estimate)", "",
        f"Grouped (`--group-by-prompt`): N = {shape.n:,} scored tokens, each response once for its {responses - 1} "
        f"pairs; the same {responses * (responses - 1) // 2} pairs per prompt one by one score each response in "
        f"each pair: {unshared.n:,} tokens. The head alone: the backbone's forward shrinks too, to the prompt "
        f"and {responses} responses once per group (--prefix-sharing) from a prompt and 2 responses per pair.", "",
        markdown_table(["design", "head", "grouped ms", "pairs one by one ms", "saved"], rows), ""])


# Interconnect per GPU and direction, and the fixed cost of one collective (NCCL's ring setup and
# launch, a few microseconds within one NVLink domain; taken as 10 us, an assumption no
# measurement here pins). NVLink 4 (H100, H200): 18 links x 25 GB/s = 450 GB/s each way;
# NVLink 3 (A100): 12 links x 25 GB/s = 300 GB/s.
NVLINK_GB_S = {"h100": 450.0, "h200": 450.0, "a100": 300.0}
SHARDED_DESIGNS = ("slab", "cuda")  # the backends a sharded head streams its slice with
COLLECTIVE_LATENCY_MS = 0.010


@dataclass
class VocabParallelPlan:
    """The vocabulary-parallel head over K processes (fastpref.vocab_parallel): each process's
    head on V / K rows (the first processes get ceil(V / K)), one all_gather of F float32 per row
    in the forward, one all_reduce of d_hidden [N, H] in the backward (ring: 2 (K - 1) / K of it
    sent per GPU), each at latency + bytes sent per GPU / NVLink bandwidth."""

    processes: int
    statistics: int
    head: Plan
    one_process: Plan
    gather_bytes: int  # each process's contribution: F N 4; it receives (K - 1) of them
    reduce_bytes: int  # d_hidden, N H in the operands' dtype
    nvlink_gb_s: float

    @property
    def gather_sent_bytes(self) -> float:
        return (self.processes - 1) * self.gather_bytes

    @property
    def reduce_sent_bytes(self) -> float:
        return 2 * (self.processes - 1) / self.processes * self.reduce_bytes

    def _transfer_ms(self, sent: float) -> float:
        return COLLECTIVE_LATENCY_MS + sent / (self.nvlink_gb_s * 1e9) * 1e3

    @property
    def gather_ms(self) -> float:
        return self._transfer_ms(self.gather_sent_bytes)

    @property
    def reduce_ms(self) -> float:
        return self._transfer_ms(self.reduce_sent_bytes)

    @property
    def predicted_ms(self) -> float:
        return self.head.predicted_ms + self.gather_ms + self.reduce_ms


def vocab_parallel_plan(shape: Shape, processes: int, head: str, design: str, device_kind_name: str,
                        scratch_bytes: int = DEFAULT_SCRATCH_BYTES, options: Sequence[str] = ()) -> VocabParallelPlan:
    """`plan` of one process's slice, with the collectives. A frozen head is not folded when sharded
    (its direction would mix the slices' softmaxes): it takes the trainable passes less d_weight."""
    from ..vocab_parallel import statistics_per_row

    if processes < 2 or processes > shape.vocab:
        raise ValueError(f"tensor-parallel processes must be in [2, V = {shape.vocab}], got {processes}")
    if design not in SHARDED_DESIGNS:
        raise ValueError(f"the sharded head runs the backends' designs {SHARDED_DESIGNS}, got {design!r}")
    local = Shape(shape.n, shape.hidden, -(-shape.vocab // processes), shape.element_bytes)
    return VocabParallelPlan(
        processes, statistics_per_row(options), plan(local, head, design, device_kind_name, scratch_bytes, options, folded=False),
        plan(shape, head, design, device_kind_name, scratch_bytes, options),
        statistics_per_row(options) * shape.n * FP32, shape.n * shape.hidden * shape.element_bytes,
        NVLINK_GB_S[device_kind_name])


def vocab_parallel_table(shape: Shape, processes: int, designs: Sequence[str], heads: Sequence[str],
                         device_kind_name: str, scratch_bytes: int, options: Sequence[str]) -> str:
    rows = []
    designs = [design for design in designs if design in SHARDED_DESIGNS]
    for design in designs:
        for head in heads:
            cost = vocab_parallel_plan(shape, processes, head, design, device_kind_name, scratch_bytes, options)
            rows.append([design, head, f"{cost.one_process.predicted_ms:,.1f}", f"{cost.head.predicted_ms:,.2f}",
                         f"{cost.gather_sent_bytes / 2**10:,.0f}", f"{cost.gather_ms:.3f}",
                         f"{cost.reduce_sent_bytes / 2**20:,.0f}", f"{cost.reduce_ms:.3f}",
                         f"{cost.predicted_ms:,.2f}"])
    statistics = vocab_parallel_plan(shape, processes, heads[0], designs[0], device_kind_name, scratch_bytes,
                                     options).statistics
    return "\n".join([
        f"## Vocabulary-parallel head over {processes} processes, NVLink {NVLINK_GB_S[device_kind_name]:.0f} GB/s "
        "per GPU and direction (model estimate)", "",
        f"Each process: V / {processes} = {-(-shape.vocab // processes):,} rows; forward all_gather of "
        f"{statistics} float32 per row ({statistics * shape.n * FP32 / 2**10:,.0f} KiB per process), backward "
        f"all_reduce of d_hidden ({shape.n * shape.hidden * shape.element_bytes / 2**20:,.0f} MiB); each "
        f"collective {COLLECTIVE_LATENCY_MS * 1e3:.0f} us + bytes sent / bandwidth.", "",
        markdown_table(["design", "head", "one process ms", "head per process ms", "all_gather KiB sent",
                        "all_gather ms", "all_reduce MiB sent", "all_reduce ms", "total per process ms"], rows), ""])
