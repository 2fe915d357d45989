"""The fused linear log-prob op: per-token log p(target) from hidden states and the LM head.

    z_n    = W h_n + b                    (never stored as a V-long row for all n)
    lse_n  = log sum_v exp(z_{n,v})       (online, block by block over V, float32)
    logp_n = z_{n,t_n} - lse_n            (0 where t_n == ignore_index)

Gradients, with g_n = dL/dlogp_n and p_{n,v} = exp(z_{n,v} - lse_n):

    dL/dh_n = g_n (W_{t_n} - sum_v p_{n,v} W_v)
    dL/dW_v = sum_n g_n (1[v = t_n] - p_{n,v}) h_n
    dL/db_v = sum_n g_n (1[v = t_n] - p_{n,v})

Ignored positions are dropped before any matmul, so prompt and padding tokens cost no FLOPs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backends

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_linear_inputs(hidden, weight, targets, bias=None) -> None:
    """Raise TypeError/ValueError naming the argument when the op's inputs do not fit together.

    hidden [N, H] float, weight [V, H] of hidden's dtype, targets [N] integer, bias [V] or None,
    all on one device, N, H and V positive.
    """
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    if bias is not None:
        named.append(("bias", bias))
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")

    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D [N, H] (flatten batch and sequence first), got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    if num_rows == 0:
        raise ValueError("hidden has N = 0 rows: the op needs at least one token")
    if width == 0:
        raise ValueError("hidden has H = 0 features: expected H >= 1")
    if vocab == 0:
        raise ValueError("weight has V = 0 rows: expected a vocabulary of at least one token")
    if weight.shape[1] != width:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {width}, got shape {tuple(weight.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != num_rows:
        raise ValueError(
            f"targets must be 1-D of length N = hidden.shape[0] = {num_rows}, got shape {tuple(targets.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise ValueError(f"bias must be 1-D of length V = {vocab}, got shape {tuple(bias.shape)}")

    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must equal hidden dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype must equal hidden dtype {hidden.dtype}, got {bias.dtype}")
    if targets.dtype not in _INDEX_DTYPES:
        raise TypeError(f"targets must be an integer tensor (int64 or int32), got {targets.dtype}")

    devices = {name: value.device for name, value in named}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")


def _kept_rows(targets: torch.Tensor, vocab: int, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows to compute (None: all of them); raises on targets outside [0, V)."""
    kept = targets != ignore_index
    out_of_range = kept & ((targets < 0) | (targets >= vocab))
    num_kept, num_bad = torch.stack([kept.sum(), out_of_range.sum()]).tolist()
    if num_bad:
        position = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"targets must lie in [0, V = {vocab}) or equal ignore_index = {ignore_index}; "
            f"{num_bad} do not, the first at position {position} (value {int(targets[position])})"
        )
    if num_kept == targets.shape[0]:
        return None
    return kept.nonzero().squeeze(1)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kept_rows, backend, want_hidden_grad):
        num_rows = hidden.shape[0]
        if kept_rows is None:
            h, t = hidden, targets
        else:
            h, t = hidden.index_select(0, kept_rows), targets.index_select(0, kept_rows)

        ctx.backend = backend
        ctx.saved = None
        if h.shape[0] == 0:
            ctx.save_for_backward(hidden, weight, bias, None, None)
            return torch.zeros(num_rows, dtype=_output_dtype(hidden), device=hidden.device)

        saved = backend.forward(h, weight, bias, t, want_hidden_grad=want_hidden_grad)
        _check_finite(saved.logp, h, kept_rows)
        if kept_rows is None:
            logp = saved.logp
        else:
            logp = torch.zeros(num_rows, dtype=saved.logp.dtype, device=hidden.device)
            logp.index_copy_(0, kept_rows, saved.logp)
        ctx.saved = saved
        ctx.save_for_backward(hidden, weight, bias, targets, kept_rows)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, kept_rows = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.saved is None:  # every position ignored: all gradients are zero
            return (
                torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None,
                None, None, None, None,
            )
        if kept_rows is None:
            h, t, g = hidden, targets, grad_logp
        else:
            h = hidden.index_select(0, kept_rows)
            t = targets.index_select(0, kept_rows)
            g = grad_logp.index_select(0, kept_rows)
        d_h, d_w, d_b = ctx.backend.backward(
            h, weight, bias, t, ctx.saved, g.contiguous(),
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        )
        if d_h is not None and kept_rows is not None:
            d_h = torch.zeros_like(hidden).index_copy_(0, kept_rows, d_h)
        return d_h, d_w, d_b, None, None, None, None


def _check_finite(logp: torch.Tensor, hidden: torch.Tensor, kept_rows: Optional[torch.Tensor]) -> None:
    """Raise when a log-prob is NaN or inf, naming the first row: finite inputs always give finite
    log-probs, so this catches NaN/inf in hidden (or weight) from the [N] results, without a pass
    over the [N, H] input unless something is wrong."""
    bad = ~torch.isfinite(logp)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    row = first if kept_rows is None else int(kept_rows[first])
    count = int(bad.sum())
    if not bool(torch.isfinite(hidden[first]).all()):
        where = f"hidden row {row} holds NaN or inf"
    else:
        where = f"hidden row {row} is finite, so weight or bias holds NaN or inf"
    raise ValueError(f"non-finite log-probability at row {row} ({count} rows in all): {where}")


def _output_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probability of each target token, computed without the [N x V] logits.

    Args:
        hidden: [N, H] final hidden states (float16, bfloat16, float32; float64 on the torch
            backend), one row per token.
        weight: [V, H] LM-head weight, same dtype and device as `hidden`.
        targets: [N] integer token ids in [0, V), or `ignore_index` for positions that do not
            count (prompt, padding). Ignored rows are dropped before any matmul.
        bias: optional [V] LM-head bias.
        ignore_index: target value marking ignored positions.
        backend: "auto" (best for the device: triton on CUDA, torch elsewhere), "triton" or
            "torch". See :func:`fastpref.available_backends`.

    Returns:
        [N] float32 (float64 for float64 inputs): log softmax(W h_n + b)[t_n], and exactly 0 at
        ignored positions. Differentiable with respect to hidden, weight and bias; when the weight
        does not require grad (frozen head, LoRA) no weight-gradient work is done.

    Non-contiguous inputs are accepted and copied to contiguous memory first (for the weight,
    that is a V x H copy: pass a contiguous weight to avoid it). The op synchronises with the
    device twice: before the kernels, to validate the targets and count the positions to compute;
    after the forward, to refuse a non-finite log-prob (NaN or inf in the inputs), naming its row.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    impl = _backends.resolve(backend, hidden.device)
    if hidden.dtype not in impl.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        raise TypeError(f"backend {impl.name!r} supports {supported}; hidden is {hidden.dtype}")

    targets = targets.long()
    kept_rows = _kept_rows(targets, weight.shape[0], ignore_index)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    want_hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearLogprobs.apply(hidden, weight, bias, targets, kept_rows, impl, want_hidden_grad)
