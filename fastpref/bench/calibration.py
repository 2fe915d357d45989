"""The cost model against published measurements: ``fastpref plan --calibrate``.

Each peer's design is counted launch by launch with the same Launch terms and the same
per-device rates as fastpref's own designs (fastpref.bench.plan), then predicted at the shape of
every figure its authors published. Nothing here is measured by fastpref: the published figures
are quoted with their source, the predictions are model estimates.

Peers' designs, as their code runs them:
  liger-cute       Liger-Kernel 0.8.5's Hopper CuTe DSL head with per-token outputs
                   (LigerFusedLinearScaledCrossEntropyFunction on sm_90). Forward: one persistent
                   warp-specialised kernel, logits never leave the chip. Backward: one persistent
                   kernel over waves of 1,024 tokens, each wave three phases between grid-wide
                   barriers: dZ (logits recomputed, bf16 dZ written), dX = dZ W, dW += dZ^T X (the
                   first wave stores, later waves bf16 TMA reduce-add): 8NHV.
  liger-cute-flce  Liger-Kernel 0.8.5's Hopper CuTe DSL fused linear cross entropy with a reduced
                   loss: the gradient in the forward (bf16 logits written once and turned into dZ
                   in place by a one-read kernel, dX = dZ W), dW = dZ^T X in the backward: 6NHV.
  quack            QuACK 0.6.1's chunked_linear_cross_entropy (reduced loss), chunks of 4,096
                   tokens: per chunk cuBLAS logits, a cross-entropy kernel writing dZ in place,
                   cuBLAS dX, a CuTe GEMM adding dZ^T X into a float32 dW (the last chunk's in
                   the backward): 6NHV.
  cce              Cut Cross-Entropy (Triton): a fused forward (GEMM + log-sum-exp); a backward of
                   one 128 x 128 tile per program that recomputes its logits and adds its share of
                   dE and dC under locks in bf16. Gradient filtering skips the products and adds
                   of tiles whose every |dZ| < 2^-12: how many is a property of the data.
  verl             verl's Triton linear_cross_entropy backward (Split_Dlogits_N): per vocabulary
                   split of 9,504 columns a Triton kernel (128 x 256 tiles) writes bf16 d_logits,
                   then cuBLAS d_hidden += d_logits W_s (a bf16 add) and d_weight_s = d_logits^T h:
                   6NHV, the slab design's backward with a wider tile.
  verl-torch       Liger's PyTorch fallback adapted from verl (512-token chunks of torch ops:
                   matmul, float32 softmax, log-sum-exp, entropy, log-softmax; a bf16 d_weight
                   chunk added into the gradient): the torch-op chunked head.
  cublas-gemms     the head's three GEMMs alone (logits, dX, dW), no loss: the matmul rate.
  trl              TRL 1.16's ChunkedLogProbFunction with DPOTrainer's tiles (4,096 tokens x 32,768
                   vocabulary columns): cuBLAS tiles, Triton passes over them, float32 d_hidden and
                   d_weight accumulated by cuBLAS across tiles. No published time.
  torch-native     PyTorch 2.13's F.linear_cross_entropy(reduction="none",
                   options=LinearCrossEntropyOptions()) on CUDA bf16: chunks of rows
                   ("aspect_ratio:2"), float32 logits per chunk, torch ops between cuBLAS GEMMs, the
                   bf16 weight gradient accumulated chunk by chunk; the backward recomputes. No
                   published time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .plan import DEVICE_KINDS, FP32, Launch, Shape, rates_line
from .report import markdown_table

BF16 = 2
# A figure is explained when the prediction is within this share of it.
TOLERANCE = 0.20

LIGER_WAVE_TOKENS = 1024
QUACK_CHUNK_TOKENS = 4096
# CCE autotunes its tiles; the model takes the first of its configurations, 128 x 128.
CCE_TILE = (128, 128)
VERL_SPLIT_COLUMNS = 9504
VERL_TILE = (128, 256)
VERL_TORCH_CHUNK_TOKENS = 512
TRL_TOKEN_TILE = 4096
TRL_VOCABULARY_TILE = 32768  # what TRL's DPOTrainer passes


def tile_count(rows: int, columns: int, tile: Sequence[int]) -> int:
    return math.ceil(rows / tile[0]) * math.ceil(columns / tile[1])


def liger_cute_forward(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    return [Launch("forward: persistent warp-specialised GEMM + online softmax (cluster-2 multicast)", 1,
                   2 * n * h * v, n * h * e + v * h * e)]


def liger_cute_backward(shape: Shape) -> List[Launch]:
    """Every wave runs at full width (its ragged rows get a zero scale); the grid-wide barrier
    after each phase makes each phase's last round of tiles a tail."""
    h, v, e = shape.hidden, shape.vocab, shape.element_bytes
    waves = math.ceil(shape.n / LIGER_WAVE_TOKENS)
    rows = waves * LIGER_WAVE_TOKENS
    wave_flops = 2 * LIGER_WAVE_TOKENS * h * v
    weight = v * h * e
    return [
        Launch("backward, per wave: dZ phase, logits recomputed, bf16 dZ stored", waves, waves * wave_flops,
               waves * weight + rows * h * e + rows * v * BF16, tiles=tile_count(LIGER_WAVE_TOKENS, v, (128, 256))),
        Launch("backward, per wave: dX phase, dX = dZ W", waves, waves * wave_flops,
               rows * v * BF16 + waves * weight + rows * h * e, tiles=tile_count(LIGER_WAVE_TOKENS, h, (128, 256))),
        # the first wave stores dW, every later one reads and writes it (bf16 TMA reduce-add)
        Launch("backward, per wave: dW phase, dW += dZ^T X", waves, waves * wave_flops,
               rows * v * BF16 + rows * h * e + (2 * waves - 1) * v * h * BF16, tiles=tile_count(v, h, (128, 256))),
    ]


def liger_cute(shape: Shape) -> List[Launch]:
    return liger_cute_forward(shape) + liger_cute_backward(shape)


def gradient_in_forward(shape: Shape, chunk: int, weight_gradient: str) -> List[Launch]:
    """Logits GEMM, a one-read cross-entropy kernel writing dZ over them, dX and dW GEMMs, per
    chunk of `chunk` rows; d_weight accumulated across chunks in float32 (QuACK) when there are
    several."""
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    chunks = math.ceil(n / chunk)
    weight = v * h * e
    # one chunk: dW written once in the weight's dtype; several: a float32 dW stored by the first
    # chunk, read and written by the others, the last one writing the weight's dtype
    accumulator = v * h * e if chunks == 1 else v * h * FP32 * (1 + 2 * (chunks - 2) + 1) + v * h * e
    return [
        Launch("per chunk: logits = X W^T, bf16 out (GEMM)", chunks, 2 * n * h * v, n * h * e + chunks * weight
               + n * v * BF16),
        Launch("per chunk: cross entropy, dZ written over the logits (one read)", chunks, 0.0, 2 * n * v * BF16),
        Launch("per chunk: dX = dZ W (GEMM)", chunks, 2 * n * h * v, n * v * BF16 + chunks * weight + n * h * e),
        Launch(f"per chunk: {weight_gradient}", chunks, 2 * n * h * v, n * v * BF16 + n * h * e + accumulator),
    ]


def liger_cute_flce(shape: Shape) -> List[Launch]:
    return gradient_in_forward(shape, shape.n, "dW = dZ^T X (persistent GEMM, scaled epilogue, in the backward)")


def quack_chunked(shape: Shape) -> List[Launch]:
    return gradient_in_forward(shape, QUACK_CHUNK_TOKENS, "dW += dZ^T X (CuTe GEMM into float32 dW)")


def cce_forward(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    return [Launch("forward: fused GEMM + log-sum-exp (Triton)", 1, 2 * n * h * v, n * h * e + v * h * e,
                   tile=CCE_TILE, tiles=tile_count(n, v, CCE_TILE), epilogue_logits=n * v)]


def cce_backward(shape: Shape, kept_share: float = 1.0) -> List[Launch]:
    """kept_share: the share of tiles gradient filtering keeps (1: no filtering). Every tile
    recomputes its logits; a kept one also multiplies dZ into dE and dC and adds both under locks
    (bf16 read and write)."""
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    locked_adds = 2 * BF16 * (n * h * math.ceil(v / CCE_TILE[1]) + v * h * math.ceil(n / CCE_TILE[0]))
    return [Launch("backward: recompute + dZ, and for kept tiles dE, dC products with locked bf16 adds (Triton)",
                   1, 2 * n * h * v * (1 + 2 * kept_share), n * h * e + v * h * e, kept_share * locked_adds,
                   tile=CCE_TILE, tiles=tile_count(n, v, CCE_TILE), epilogue_logits=n * v)]


def cce(shape: Shape, kept_share: float = 1.0) -> List[Launch]:
    return cce_forward(shape) + cce_backward(shape, kept_share)


def verl_backward(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    launches = []
    for start in range(0, v, VERL_SPLIT_COLUMNS):
        columns = min(VERL_SPLIT_COLUMNS, v - start)
        launches += [
            Launch("per split: logits recomputed, bf16 d_logits stored (Triton)", 1, 2 * n * h * columns,
                   n * h * e + columns * h * e + n * columns * BF16, tile=VERL_TILE,
                   tiles=tile_count(n, columns, VERL_TILE), epilogue_logits=n * columns),
            Launch("per split: d_logits W_s (cuBLAS)", 1, 2 * n * h * columns,
                   n * columns * BF16 + columns * h * e + n * h * e),
            Launch("per split: d_weight_s = d_logits^T h (cuBLAS)", 1, 2 * n * h * columns,
                   n * columns * BF16 + n * h * e + columns * h * e),
        ]
        if start:  # the first split writes d_hidden, the others add into it
            launches.append(Launch("per split: d_hidden += the product (bf16 add)", 1, 0.0, 3 * n * h * e))
    return launches


# Bytes per logit of Liger's verl-derived fallback, op by op (bf16 2, float32 4; r = read, w = write):
#   forward:  / temperature r2 w2; .float() r2 w4; softmax (three reads of a 512 KiB row) r12 w4;
#             logsumexp (amax r4, x - max r4 w4, exp_ r4 w4, sum r4); (probs * logits) r8 w4 and
#             its sum r4; log_softmax r12 w4
#   backward: / temperature r2 w2; .float() r2 w4; softmax r12 w4; zeros_like w4; one_hot w4;
#             one_hot - probs r8 w4; g * (...) r4 w4; add_ r8 w4; .to(bf16) r4 w2; / temperature r2 w2
VERL_TORCH_FORWARD_BYTES_PER_LOGIT = 4 + 6 + 16 + 24 + 16 + 16
VERL_TORCH_BACKWARD_BYTES_PER_LOGIT = 4 + 6 + 16 + 4 + 4 + 12 + 8 + 12 + 6 + 4


def verl_torch_forward(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    chunks = math.ceil(n / VERL_TORCH_CHUNK_TOKENS)
    return [
        Launch("per chunk: logits (cuBLAS, bf16 out)", chunks, 2 * n * h * v,
               n * h * e + chunks * v * h * e + n * v * BF16),
        Launch("per chunk: softmax, log-sum-exp, entropy, log-softmax (torch ops)", chunks, 0.0,
               n * v * VERL_TORCH_FORWARD_BYTES_PER_LOGIT),
    ]


def verl_torch_backward(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    chunks = math.ceil(n / VERL_TORCH_CHUNK_TOKENS)
    weight = v * h * e
    return [
        Launch("per chunk: logits recomputed (cuBLAS)", chunks, 2 * n * h * v, n * h * e + chunks * weight
               + n * v * BF16),
        Launch("per chunk: softmax, grad_logits (torch ops)", chunks, 0.0, n * v * VERL_TORCH_BACKWARD_BYTES_PER_LOGIT),
        Launch("per chunk: grad_logits W (cuBLAS)", chunks, 2 * n * h * v, n * v * BF16 + chunks * weight + n * h * e),
        Launch("per chunk: grad_logits^T h, a fresh bf16 [V, H] (cuBLAS)", chunks, 2 * n * h * v,
               n * v * BF16 + n * h * e + chunks * weight),
        Launch("per chunk: d_weight.add_(chunk) and d_hidden[chunk].add_ (torch ops)", chunks, 0.0,
               chunks * 3 * weight + 3 * n * h * e),
    ]


def verl_torch(shape: Shape) -> List[Launch]:
    return verl_torch_forward(shape) + verl_torch_backward(shape)


def cublas_gemms(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    return [
        Launch("logits = X W^T (cuBLAS)", 1, 2 * n * h * v, n * h * e + v * h * e + n * v * e),
        Launch("dX = G W (cuBLAS)", 1, 2 * n * h * v, n * v * e + v * h * e + n * h * e),
        Launch("dW = G^T X (cuBLAS)", 1, 2 * n * h * v, n * v * e + n * h * e + v * h * e),
    ]


def trl_chunked(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    token_tiles, vocabulary_tiles = math.ceil(n / TRL_TOKEN_TILE), math.ceil(v / TRL_VOCABULARY_TILE)
    count = token_tiles * vocabulary_tiles
    recompute_bytes = vocabulary_tiles * n * h * e + token_tiles * v * h * e + n * v * e
    return [
        Launch("forward, per tile: logits tile (cuBLAS)", count, 2 * n * h * v, recompute_bytes),
        Launch("forward, per tile: online log-sum-exp over the tile (Triton)", count, 0.0, n * v * e),
        Launch("backward: float32 d_hidden and d_weight zeroed", 2, 0.0, (n + v) * h * FP32),
        Launch("backward, per tile: logits tile recomputed (cuBLAS)", count, 2 * n * h * v, recompute_bytes),
        Launch("backward, per tile: dZ written over the tile (Triton)", count, 0.0, 2 * n * v * e),
        Launch("backward, per tile: d_hidden += dZ W_s, float32 (cuBLAS)", count, 2 * n * h * v,
               n * v * e + token_tiles * v * h * e + vocabulary_tiles * 2 * n * h * FP32),
        Launch("backward, per tile: d_weight_s += dZ^T h, float32 (cuBLAS)", count, 2 * n * h * v,
               n * v * e + vocabulary_tiles * n * h * e + token_tiles * 2 * v * h * FP32),
        Launch("backward: gradients cast to the inputs' dtype", 2, 0.0, (n + v) * h * (FP32 + e)),
    ]


def torch_native_chunk_rows(shape: Shape) -> int:
    """PyTorch 2.13's "aspect_ratio:2" on CUDA half precision: the chunk whose logits match the
    input's size, rounded up to a power of two, halved."""
    columns_per_feature = math.ceil(shape.vocab / shape.hidden)
    target = math.ceil(shape.n / columns_per_feature)
    return max(1, min((1 << (target - 1).bit_length()) // 2, shape.n))


# Bytes per logit of PyTorch 2.13's chunk loop on CUDA bf16 (float32 logits), op by op:
#   forward:  amax r4; sub_ r4 w4; exp_ r4 w4; sum r4
#   backward: the same 24, then mul by the row factor r4 w4 and the cast to bf16 r4 w2
TORCH_NATIVE_FORWARD_BYTES_PER_LOGIT = 4 + 8 + 8 + 4
TORCH_NATIVE_BACKWARD_BYTES_PER_LOGIT = TORCH_NATIVE_FORWARD_BYTES_PER_LOGIT + 8 + 6


def torch_native(shape: Shape) -> List[Launch]:
    n, h, v, e = shape.n, shape.hidden, shape.vocab, shape.element_bytes
    chunks = math.ceil(n / torch_native_chunk_rows(shape))
    weight = v * h * e
    logits = n * h * e + chunks * weight + n * v * FP32
    return [
        Launch("forward, per chunk: logits, float32 out (cuBLAS)", chunks, 2 * n * h * v, logits),
        Launch("forward, per chunk: max, exp, sum (torch ops)", chunks, 0.0,
               n * v * TORCH_NATIVE_FORWARD_BYTES_PER_LOGIT),
        Launch("backward: bf16 d_weight zeroed", 1, 0.0, weight),
        Launch("backward, per chunk: logits recomputed (cuBLAS)", chunks, 2 * n * h * v, logits),
        Launch("backward, per chunk: softmax scaled by the upstream gradient, cast to bf16 (torch ops)", chunks, 0.0,
               n * v * TORCH_NATIVE_BACKWARD_BYTES_PER_LOGIT),
        Launch("backward, per chunk: d_hidden = W_t g - dZ W (cuBLAS addmm)", chunks, 2 * n * h * v,
               n * v * BF16 + chunks * weight + 2 * n * h * e),
        Launch("backward, per chunk: d_weight += dZ^T h in bf16 (cuBLAS addmm_)", chunks, 2 * n * h * v,
               n * v * BF16 + n * h * e + chunks * 2 * weight),
    ]


DESIGNS = {
    "liger-cute": liger_cute, "liger-cute forward": liger_cute_forward, "liger-cute backward": liger_cute_backward,
    "liger-cute-flce": liger_cute_flce, "quack": quack_chunked, "cce forward": cce_forward,
    "cce backward": cce_backward, "cce": cce, "verl backward": verl_backward, "verl-torch": verl_torch,
    "verl-torch forward": verl_torch_forward, "verl-torch backward": verl_torch_backward,
    "cublas-gemms": cublas_gemms, "trl": trl_chunked, "torch-native": torch_native,
}


def predicted_ms(launches: Sequence[Launch], device_kind: str, element_bytes: int = BF16) -> float:
    device = DEVICE_KINDS[device_kind]
    return sum(launch.predicted_ms(device, element_bytes) for launch in launches)


@dataclass(frozen=True)
class Figure:
    """A published time: `design` (a key of DESIGNS) on `device_kind` at `shape`, in ms."""

    design: str
    device_kind: str
    shape: Shape
    published_ms: float
    source: str

    def predicted_ms(self, design: Optional[Callable[[Shape], List[Launch]]] = None) -> float:
        return predicted_ms((design or DESIGNS[self.design])(self.shape), self.device_kind, self.shape.element_bytes)

    @property
    def ratio(self) -> float:
        return self.predicted_ms() / self.published_ms


def from_tflops(flop_multiple: int, shape: Shape, tflops: float) -> float:
    """A time in ms from a published rate over flop_multiple x NHV."""
    return flop_multiple * shape.n * shape.hidden * shape.vocab / (tflops * 1e12) * 1e3


LIGER_README = "Liger-Kernel 0.8.5 README, H100 bf16 table, entropy off"
LIGER_SM90_FLCE = "Liger-Kernel 0.8.5, ops/cutedsl/ops/fused_linear_cross_entropy_sm90.py docstring"
LIGER_SM90_BACKWARD = "Liger-Kernel 0.8.5, ops/cutedsl/ops/_fused_scaled_cross_entropy_backward_fused_sm90.py docstring"
CCE_PAPER = "Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models (ICLR 2025), Table 1, A100-SXM4"
LIGER_PR_1422 = "linkedin/Liger-Kernel pull request 1422, H200 TP1 table, verl's TF/GPU (6NHV)"
TRL_ISSUE_7244 = "huggingface/trl issue 7244, H100 bf16: the bare lm_head GEMM forward + backward"

LLAMA_HEAD = dict(hidden=4096, vocab=131072)
GEMMA2_HEAD = Shape(8192, 2304, 256000)

FIGURES: List[Figure] = [
    *[Figure("liger-cute forward", "h100", Shape(n, **LLAMA_HEAD), ms, LIGER_README)
      for n, ms in ((2048, 3.12), (4096, 6.05), (8192, 12.25), (16384, 23.84), (32768, 49.69))],
    *[Figure("liger-cute backward", "h100", Shape(n, **LLAMA_HEAD), ms, LIGER_README)
      for n, ms in ((8192, 37.93), (16384, 79.42), (32768, 163.34))],
    *[Figure("liger-cute", "h100", Shape(n, **LLAMA_HEAD), ms, LIGER_README)
      for n, ms in ((8192, 50.39), (16384, 104.77), (32768, 211.30))],
    Figure("liger-cute backward", "h200", Shape(4096, **LLAMA_HEAD), 20.08, LIGER_SM90_BACKWARD),
    Figure("liger-cute-flce", "h200", Shape(4096, 4096, 128256), 18.06, LIGER_SM90_FLCE),
    Figure("quack", "h200", Shape(4096, 4096, 128256), 17.33, LIGER_SM90_FLCE + " (QuACK 0.6.1)"),
    Figure("cce forward", "a100", GEMMA2_HEAD, 43.0, CCE_PAPER),
    Figure("cce backward", "a100", GEMMA2_HEAD, 324.0, CCE_PAPER + ", no gradient filter"),
    Figure("cce", "a100", GEMMA2_HEAD, 362.0, CCE_PAPER + ", no gradient filter"),
    *[Figure("verl backward", "h200", shape, from_tflops(6, shape, tflops), LIGER_PR_1422)
      for shape, tflops in ((Shape(2048, 4096, 131072), 445.2), (Shape(8192, 4096, 131072), 510.6),
                            (Shape(8192, 4096, 65536), 507.3), (Shape(8192, 2048, 131072), 378.9))],
    *[Figure(design, "h100", Shape(16384, **LLAMA_HEAD), ms, LIGER_README + ", Verl Torch fallback")
      for design, ms in (("verl-torch forward", 90.81), ("verl-torch backward", 166.85), ("verl-torch", 254.91))],
    Figure("cublas-gemms", "h100", Shape(8192, 4096, 151936), 42.0, TRL_ISSUE_7244),
]

# Figures whose time depends on the data: CCE's gradient filtering skips the tiles the data lets it
# skip, a share the paper does not publish. The table shows the share the model needs; they are
# not counted.
FILTERED_FIGURES: List[Figure] = [
    Figure("cce backward", "a100", GEMMA2_HEAD, 95.0, CCE_PAPER + ", gradient filter, Gemma 2 2B on Alpaca"),
    Figure("cce", "a100", GEMMA2_HEAD, 135.0, CCE_PAPER + ", gradient filter, Gemma 2 2B on Alpaca"),
]

# Designs no figure checks: predicted at the headline shape beside the calibrated ones.
UNPUBLISHED = [("trl", "TRL 1.16 ChunkedLogProbFunction (DPOTrainer tiles)"),
               ("torch-native", "PyTorch 2.13 F.linear_cross_entropy, reduction='none', chunked")]
# The shape fastpref's GPU head is aimed at: a trainable head <= 100 ms, a frozen one <= 50 ms, on an H100.
HEADLINE = Shape(16384, **LLAMA_HEAD)
HEADLINE_DEVICE = "h100"
# The peers that give per-token log-probs with per-token upstream gradients (what DPO needs):
# QuACK's and Liger's reduced-loss heads compute the gradient in the forward for one scalar loss.
PER_TOKEN_PEERS = ("liger-cute", "trl", "torch-native", "verl-torch")


def implied_kept_share(figure: Figure) -> Optional[float]:
    """The share of tiles CCE's filter must keep for the model to predict `figure` (bisection:
    the prediction grows with the share); None when no share in [0, 1] reaches it."""
    def at(share: float) -> float:
        return figure.predicted_ms(lambda shape: DESIGNS[figure.design](shape, share))

    low, high = 0.0, 1.0
    if not at(low) <= figure.published_ms <= at(high):
        return None
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if at(middle) < figure.published_ms else (low, middle)
    return (low + high) / 2


def within_tolerance(ratio: float) -> bool:
    return abs(ratio - 1) <= TOLERANCE


def worst(figures: Sequence[Figure]) -> Figure:
    """The figure the model misses by the most (predicted / published farthest from 1)."""
    return max(figures, key=lambda figure: abs(math.log(figure.ratio)))


def headline_rows() -> List[List[str]]:
    """fastpref's designs and the per-token peers at the headline shape, at the same rates."""
    from .plan import DESIGNS as FASTPREF_DESIGNS, EXTRA_BYTES, materialized_extra_bytes, plan

    device = DEVICE_KINDS[HEADLINE_DEVICE]
    rows = []
    for design in FASTPREF_DESIGNS:
        for head in ("trainable", "frozen"):
            result = plan(HEADLINE, head, design, HEADLINE_DEVICE)
            extra = EXTRA_BYTES[design](HEADLINE, head, _default_scratch())
            rows.append([f"fastpref {design}", head, f"{result.predicted_ms:.1f}",
                         f"{result.share_of_peak * device.matmul_tflops:.0f}",
                         f"{100 * extra / materialized_extra_bytes(HEADLINE):.2f}%"])
    for design in PER_TOKEN_PEERS:
        ms = predicted_ms(DESIGNS[design](HEADLINE), HEADLINE_DEVICE)
        published = [f.published_ms for f in FIGURES if f.design == design and f.shape == HEADLINE
                     and f.device_kind == HEADLINE_DEVICE]
        rows.append([design + (f" (published {published[0]:.1f})" if published else ""), "trainable", f"{ms:.1f}",
                     f"{8 * HEADLINE.n * HEADLINE.hidden * HEADLINE.vocab / (ms * 1e9):.0f}", "-"])
    return rows


def _default_scratch() -> int:
    from ..backends import DEFAULT_SCRATCH_BYTES

    return DEFAULT_SCRATCH_BYTES


def format_calibration(figures: Sequence[Figure] = FIGURES) -> str:
    def row(figure: Figure, predicted: str, ratio: str) -> List[str]:
        return [figure.design, DEVICE_KINDS[figure.device_kind].name, figure.shape.describe(),
                f"{figure.published_ms:.2f}", predicted, ratio, figure.source]

    rows = [row(f, f"{f.predicted_ms():.2f}", f"{f.ratio:.2f}" + ("" if within_tolerance(f.ratio) else " (off)"))
            for f in figures]
    for figure in FILTERED_FIGURES:
        share = implied_kept_share(figure)
        needed = "no share reaches it" if share is None else f"the model needs {100 * share:.0f}% of tiles kept"
        rows.append(row(figure, "-", f"not counted: {needed}"))
    for design, description in UNPUBLISHED:
        rows.append([design, DEVICE_KINDS[HEADLINE_DEVICE].name, HEADLINE.describe(), "none published",
                     f"{predicted_ms(DESIGNS[design](HEADLINE), HEADLINE_DEVICE):.2f}", "-", description])
    bad = worst(figures)
    return "\n".join([
        "# Cost model calibration: predicted (model estimates) against published measurements", "",
        "One set of rates for every design (fastpref's and the peers'):", "",
        *[f"- {rates_line(device)}" for device in DEVICE_KINDS.values()], "",
        "ratio = predicted / published; a figure is explained within "
        f"{100 * TOLERANCE:.0f}% (ratio {1 - TOLERANCE:.2f}-{1 + TOLERANCE:.2f}). Forward + backward "
        "unless the design says forward or backward; bf16 operands.", "",
        markdown_table(["design", "device", "shape", "published ms", "predicted ms", "ratio", "source"], rows), "",
        f"## At the same rates: {HEADLINE.describe()}, {DEVICE_KINDS[HEADLINE_DEVICE].name}, bf16 (model estimates)",
        "",
        markdown_table(["design", "head", "predicted ms", "TFLOP/s over 8NHV or 4NHV", "extra memory vs materialized"],
                       headline_rows()), "",
        f"calibration: worst ratio {bad.ratio:.2f} over {len(figures)} published figures",
    ])
