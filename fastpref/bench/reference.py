"""The standard computation every method is judged against, and the inputs all of them share.

Logits z = W h have standard deviation LOGIT_STD (hidden ~ N(0, 1), weight ~ N(0, LOGIT_STD^2 / H)):
a softmax that is neither flat nor one-hot, as in a trained model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100
LOGIT_STD = 2.0
# A run is wrong when its output's error or a gradient's max error relative to the reference's
# largest entry exceeds these. Loose enough for low-precision logits and for TF32, tight enough
# to catch a dropped vocabulary block or a wrong gradient.
TOLERANCES = {
    torch.float32: (1e-2, 1e-2),
    torch.bfloat16: (1e-1, 5e-2),
    torch.float16: (5e-2, 2e-2),
}
# Row chunks of the reference hold at most this many float32 logits at once: 64 MiB on a CPU,
# 1 GiB on a GPU, where bigger matmuls keep a Llama-sized reference to seconds.
REFERENCE_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def reference_rows(weight: torch.Tensor) -> int:
    """Rows per chunk of the reference for this head."""
    return max(1, REFERENCE_CHUNK_ELEMENTS.get(weight.device.type, 1 << 24) // weight.shape[0])


def head_flop_floor(scored: int, hidden: int, vocab: int, head: str) -> float:
    """The LM head's FLOP floor for a forward+backward over `scored` tokens: 8 N H V with a
    trainable head (logits, their recomputation, d_hidden, d_weight), 4 N H V with a frozen one
    (logits and d_hidden, the softmax-weighted rows accumulated in the forward)."""
    return (8 if head == "trainable" else 4) * scored * hidden * vocab


def tflops(flops: float, time_ms: float) -> float:
    return flops / (time_ms * 1e-3) / 1e12


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def random_head(vocab: int, hidden: int, dtype: torch.dtype, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """An LM-head weight [V, H] ~ N(0, LOGIT_STD^2 / H)."""
    weight = torch.randn(vocab, hidden, dtype=dtype, device=device, generator=generator)
    return weight.mul_(LOGIT_STD / math.sqrt(hidden))


def materialized_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The standard computation (as in TRL): full [..., V] logits, float32 log-softmax, gather;
    0 where the target is ignored."""
    return logprobs_from_logits(hidden @ weight.t(), targets, ignore_index)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """float32 log-softmax of [..., V] logits gathered at the targets; 0 where the target is ignored."""
    kept = targets != ignore_index
    safe_targets = torch.where(kept, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logp * kept


@dataclass
class TokenReference:
    logp: torch.Tensor      # [N] float32
    d_hidden: torch.Tensor  # [N, H] float32
    d_weight: torch.Tensor  # [V, H] float32


def token_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int,
                 ignored_fraction: float):
    """(hidden [N, H] requiring grad, weight [V, H] (random_head), targets [N] with about
    `ignored_fraction` of them IGNORE_INDEX, upstream gradient [N] float32), fresh from `seed`."""
    gen = torch.Generator(device).manual_seed(seed)
    kw = dict(device=device, generator=gen)
    hidden_states = torch.randn(n, hidden, dtype=dtype, **kw).requires_grad_()
    weight = random_head(vocab, hidden, dtype, gen, device)
    targets = torch.randint(0, vocab, (n,), **kw)
    targets[torch.rand(n, **kw) < ignored_fraction] = IGNORE_INDEX
    return hidden_states, weight, targets, torch.randn(n, dtype=torch.float32, **kw)


def token_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    grad_out: torch.Tensor) -> TokenReference:
    """materialized_logprobs in float32 and its gradients for an upstream gradient `grad_out`
    [N], a few rows at a time so that it fits wherever the methods under test do."""
    hidden = hidden.detach().float()
    weight = weight.detach().float().requires_grad_()
    rows = reference_rows(weight)
    logps, d_hidden = [], []
    for r0 in range(0, hidden.shape[0], rows):
        chunk = hidden[r0:r0 + rows].requires_grad_()
        logp = materialized_logprobs(chunk, weight, targets[r0:r0 + rows])
        logp.backward(grad_out[r0:r0 + rows])
        logps.append(logp.detach())
        d_hidden.append(chunk.grad)
    return TokenReference(torch.cat(logps), torch.cat(d_hidden), weight.grad)


def float32_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """materialized_logprobs in float32 without gradients, a few rows at a time (any leading shape)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    rows = reference_rows(weight)
    with torch.no_grad():
        logp = torch.cat([
            materialized_logprobs(flat_hidden[r0:r0 + rows].float(), weight.float(), flat_targets[r0:r0 + rows])
            for r0 in range(0, flat_hidden.shape[0], rows)])
    return logp.reshape(targets.shape)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (absolute where want is all zeros)."""
    scale = want.abs().max().item()
    return (got.float() - want).abs().max().item() / (scale if scale > 0 else 1.0)
