"""The fused linear log-prob op: per-token log p(target) from hidden states and the LM head.

    x_n    = W h_n + b                    (never stored as a V-long row for all n)
    z_n    = s(x_n)                       (the logit transform: scale, soft cap, temperature)
    lse_n  = log sum_v exp(z_{n,v})       (online, block by block over V, float32)
    logp_n = z_{n,t_n} - lse_n            (0 where t_n == ignore_index)

and, in the same pass, TRL's per-token outputs when asked for:

    entropy_n          = lse_n - sum_v p_{n,v} z_{n,v}
    log_sum_sq_probs_n = log sum_v p_{n,v}^2
    mean_logits_n      = (1/V) sum_v z_{n,v}
    is_top1_n          = t_n == argmax_v z_{n,v}   (the first maximum, as torch.argmax)

Gradients, with g_n = dL/dlogp_n, g^H_n = dL/dentropy_n, p_{n,v} = exp(z_{n,v} - lse_n) and
J_{n,v} = dz/dx the transform's slope:

    dL/dz_{n,v} = g_n (1[v = t_n] - p_{n,v}) - g^H_n p_{n,v} (log p_{n,v} + entropy_n)
    dL/dx_{n,v} = J_{n,v} dL/dz_{n,v}
    dL/dh_n = sum_v dL/dx_{n,v} W_v,   dL/dW_v = sum_n dL/dx_{n,v} h_n,   dL/db_v = sum_n dL/dx_{n,v}

The op is a PyTorch custom op (``torch.ops.fastpref.linear_logprobs`` and its backward
``torch.ops.fastpref.linear_logprobs_backward``) with fake implementations and a registered
autograd formula: ``torch.compile(fullgraph=True)`` traces through it, and everything the backward
needs goes through ``save_for_backward`` (so saved-tensor hooks and ``save_on_cpu`` see it).
It never reads a tensor's value on the host: bad targets and non-finite results are flagged on
the device and raised later (see :mod:`fastpref.deferred_errors`), or at once with ``check=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor

from . import backends as _backends
from . import deferred_errors
from .backends import EXTRA_OUTPUTS, ForwardResult, HeadOptions
from .backends.scratch import check_scratch_bytes, scratch_bytes as default_scratch_bytes
from .logit_transform import LogitTransform

OUTPUT_NAMES = ("log_probs",) + EXTRA_OUTPUTS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_UNKNOWN = -1  # num_kept not given: every row is computed


@dataclass
class LinearLogprobsOutput:
    """The per-token outputs of :func:`linear_logprobs` with ``outputs=``, TRL's names and meaning
    (``FusedCausalLMOutput``), each [N], 0 (False) at ignored positions; None when not asked for.

    log_probs and entropy are float32 (float64 for float64 inputs) and differentiable;
    log_sum_sq_probs and mean_logits are float32 without gradient; is_top1 is bool.
    """

    log_probs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


def check_linear_inputs(hidden, weight, targets, bias=None) -> None:
    """Raise TypeError/ValueError naming the argument when the op's inputs do not fit together.

    hidden [N, H] float, weight [V, H] of hidden's dtype, targets [N] integer, bias [V] or None,
    all on one device, N, H and V positive. Reads shapes and dtypes only, never values.
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


def check_outputs(outputs: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The extra outputs named by `outputs` (None: none), in EXTRA_OUTPUTS order."""
    if outputs is None:
        return ()
    if isinstance(outputs, str) or not all(isinstance(name, str) for name in outputs):
        raise TypeError(f"outputs must be a tuple of names among {OUTPUT_NAMES}, got {outputs!r}")
    unknown = [name for name in outputs if name not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs names {unknown}, which are not among {OUTPUT_NAMES}")
    return tuple(name for name in EXTRA_OUTPUTS if name in outputs)


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_computed(num_rows: int, num_kept: int) -> int:
    return num_rows if num_kept == _UNKNOWN else num_kept


def _kept_rows(kept: torch.Tensor, num_kept: int) -> torch.Tensor:
    """The indices of the `num_kept` rows where `kept`, in order, without a host synchronisation:
    each kept row's rank is scattered into its slot; rows past num_kept (a wrong count, flagged
    by the caller) go to a slot that is cut off."""
    rank = kept.long().cumsum(0) - 1
    slot = torch.where(kept, rank, num_kept).clamp_(max=num_kept)
    rows = torch.zeros(num_kept + 1, dtype=torch.long, device=kept.device)
    rows.scatter_(0, slot, torch.arange(kept.shape[0], device=kept.device))
    return rows[:num_kept]


@dataclass
class ComputedRows:
    """The rows a call computes: hidden rows, safe targets, which of them count, where they sit."""

    hidden: torch.Tensor  # [M, H]
    targets: torch.Tensor  # [M], in [0, V)
    counts: torch.Tensor  # [M] bool: the target is a real one in range
    rows: Optional[torch.Tensor]  # [M] indices into the N rows, None when M = N in order


def computed_rows(hidden, vocab, targets, ignore_index: int, num_kept: int, rows=None) -> ComputedRows:
    """With num_kept unknown, every row, the ignored ones zeroed (they count for nothing, and
    whatever they hold must not reach a gradient); with num_kept = N, every row as it is; else
    the num_kept kept rows (`rows`, or found here)."""
    valid = (targets != ignore_index) & (targets >= 0) & (targets < vocab)
    if num_kept == _UNKNOWN:
        computed_hidden = hidden.masked_fill(~valid[:, None], 0)
    elif num_kept == hidden.shape[0]:
        computed_hidden = hidden
    else:
        if rows is None:
            rows = _kept_rows(targets != ignore_index, num_kept)
        computed_hidden, targets, valid = hidden.index_select(0, rows), targets.index_select(0, rows), \
            valid.index_select(0, rows)
    return ComputedRows(computed_hidden, torch.where(valid, targets, 0), valid, rows)


def spread_rows(values: torch.Tensor, computed: ComputedRows, num_rows: int) -> torch.Tensor:
    """[M] values of the computed rows -> [N], zero (False) wherever the target does not count."""
    values = torch.where(computed.counts, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if computed.rows is None:
        return values
    return values.new_zeros(num_rows).index_copy_(0, computed.rows, values)


def _error_flags(hidden, targets, log_probs, ignore_index: int, vocab: int) -> torch.Tensor:
    """[7] int64 on the device: out-of-range targets (count, first position, its value), the
    number of kept targets, non-finite log-probs (count, first row) and whether that row of hidden
    is finite."""
    kept = targets != ignore_index
    out_of_range = kept & ((targets < 0) | (targets >= vocab))
    first_bad = out_of_range.to(torch.uint8).argmax()
    non_finite = kept & ~out_of_range & ~torch.isfinite(log_probs)
    first_non_finite = non_finite.to(torch.uint8).argmax()
    hidden_row_finite = torch.isfinite(hidden.index_select(0, first_non_finite[None])).all()
    return torch.stack([out_of_range.sum(), first_bad, targets.gather(0, first_bad[None])[0], kept.sum(),
                        non_finite.sum(), first_non_finite, hidden_row_finite.long()])


def _describe_errors(vocab: int, ignore_index: int, num_kept: int):
    """(errors, non-finite values) read off _error_flags: two functions of the flags that return a
    message or None (see fastpref.deferred_errors)."""
    def describe(flags: List[int]) -> Optional[str]:
        num_bad, first_bad, bad_value, num_kept_found = flags[:4]
        if num_bad:
            return (f"targets must lie in [0, V = {vocab}) or equal ignore_index = {ignore_index}; "
                    f"{num_bad} do not, the first at position {first_bad} (value {bad_value})")
        if num_kept != _UNKNOWN and num_kept_found != num_kept:
            return (f"num_kept = {num_kept}, but {num_kept_found} targets are not ignore_index = "
                    f"{ignore_index}")
        return None

    def describe_non_finite(flags: List[int]) -> Optional[str]:
        num_non_finite, first_non_finite, row_finite = flags[4:]
        if not num_non_finite:
            return None
        where = (f"hidden row {first_non_finite} is finite, so weight or bias holds NaN or inf"
                 if row_finite else f"hidden row {first_non_finite} holds NaN or inf")
        return f"non-finite log-probability at row {first_non_finite} ({num_non_finite} rows in all): {where}"

    return describe, describe_non_finite


def report_errors(hidden, targets, log_probs, ignore_index: int, vocab: int, num_kept: int, check: bool) -> None:
    """The op's bad targets and non-finite log-probs, handed to fastpref.deferred_errors: raised at
    once with `check`, else deferred (bad targets as errors, non-finite log-probs as values let
    through until asked for)."""
    flags = _error_flags(hidden, targets, log_probs, ignore_index, vocab)
    describe = _describe_errors(vocab, ignore_index, num_kept)
    (deferred_errors.check_now if check else deferred_errors.defer)(flags, *describe)


def empty_output(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _options(logit_scale, softcap, temperature, outputs, scratch_bytes) -> HeadOptions:
    """The backends' options from the op's arguments (`outputs`: one flag per EXTRA_OUTPUTS)."""
    names = frozenset(name for name, wanted in zip(EXTRA_OUTPUTS, outputs) if wanted)
    return HeadOptions(LogitTransform(logit_scale, softcap, temperature), names, scratch_bytes)


def _forward_impl(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ignore_index: int, num_kept: int, backend: str, logit_scale: float, softcap: Optional[float],
    temperature: float, outputs: List[bool], scratch_bytes: int, fold_hidden_gradient: bool, check: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_probs [N], entropy, log_sum_sq_probs, mean_logits, is_top1 ([N] or empty when not
    asked for), rows [M] (empty: all rows in order), lse [M], miss [M], direction [M, H] (empty
    unless folded)); inputs validated by linear_logprobs."""
    deferred_errors.raise_landed_errors()
    impl = _backends.resolve(backend, hidden.device)
    options = _options(logit_scale, softcap, temperature, outputs, scratch_bytes)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    computed = computed_rows(hidden, vocab, targets, ignore_index, num_kept)
    if computed.hidden.shape[0]:
        # autocast would round the backends' float32-accumulated matmuls: the op computes in its inputs' dtype
        with torch.autocast(hidden.device.type, enabled=False):
            result = impl.forward(computed.hidden, weight, bias, computed.targets, options,
                                  fold_hidden_gradient=fold_hidden_gradient)
    else:
        result = _empty_result(hidden, options, fold_hidden_gradient)
    spread = [spread_rows(result.logp, computed, num_rows)]
    for name in EXTRA_OUTPUTS:
        spread.append(spread_rows(getattr(result, name), computed, num_rows) if name in options.outputs
                      else empty_output(hidden, torch.bool if name == "is_top1" else spread[0].dtype))

    report_errors(hidden, targets, spread[0], ignore_index, vocab, num_kept, check)
    direction = result.hidden_grad_direction
    return (*spread, empty_output(targets) if computed.rows is None else computed.rows, result.lse, result.miss,
            empty_output(hidden) if direction is None else direction)


_forward_op = torch.library.custom_op("fastpref::linear_logprobs", mutates_args=())(_forward_impl)


def _empty_result(hidden, options: HeadOptions, fold_hidden_gradient: bool) -> ForwardResult:
    dtype = _output_dtype(hidden.dtype)

    def empty(name=None):
        return empty_output(hidden, torch.bool if name == "is_top1" else dtype)

    result = ForwardResult(empty(), empty(), empty())
    for name in options.outputs:
        setattr(result, name, empty(name))
    if fold_hidden_gradient:
        result.hidden_grad_direction = hidden.new_empty((0, hidden.shape[1]))
    return result


@_forward_op.register_fake
def _forward_fake(hidden, weight, bias, targets, ignore_index, num_kept, backend, logit_scale, softcap,
                  temperature, outputs, scratch_bytes, fold_hidden_gradient, check):
    num_rows, width = hidden.shape
    dtype = _output_dtype(hidden.dtype)
    computed = _num_computed(num_rows, num_kept)

    def per_row(name):
        if not outputs[EXTRA_OUTPUTS.index(name)]:
            return hidden.new_empty(0, dtype=torch.bool if name == "is_top1" else dtype)
        return hidden.new_empty(num_rows, dtype=torch.bool if name == "is_top1" else dtype)

    compacted = num_kept not in (_UNKNOWN, num_rows)
    return (hidden.new_empty(num_rows, dtype=dtype), *(per_row(name) for name in EXTRA_OUTPUTS),
            targets.new_empty(computed if compacted else 0, dtype=torch.long),
            hidden.new_empty(computed, dtype=dtype), hidden.new_empty(computed, dtype=dtype),
            hidden.new_empty((computed, width) if fold_hidden_gradient else (0,)))


def _backward_impl(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    rows: torch.Tensor, lse: torch.Tensor, miss: torch.Tensor, entropy: torch.Tensor, direction: torch.Tensor,
    grad_log_probs: torch.Tensor, grad_entropy: Optional[torch.Tensor], ignore_index: int, num_kept: int,
    backend: str, logit_scale: float, softcap: Optional[float], temperature: float, outputs: List[bool],
    scratch_bytes: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias), each empty when not needed."""
    impl = _backends.resolve(backend, hidden.device)
    options = _options(logit_scale, softcap, temperature, outputs, scratch_bytes)
    computed = computed_rows(hidden, weight.shape[0], targets, ignore_index, num_kept, rows if rows.numel() else None)
    d_hidden = d_weight = d_bias = None
    if computed.hidden.shape[0]:
        def gathered(values):
            values = values if computed.rows is None else values.index_select(0, computed.rows)
            return torch.where(computed.counts, values, torch.zeros((), dtype=values.dtype, device=values.device))

        grad_entropy = None if grad_entropy is None else gathered(grad_entropy).contiguous()
        saved = ForwardResult(logp=None, lse=lse, miss=miss,
                              entropy=None if grad_entropy is None else gathered(entropy),
                              hidden_grad_direction=direction if direction.numel() else None)
        with torch.autocast(hidden.device.type, enabled=False):
            d_hidden, d_weight, d_bias = impl.backward(
                computed.hidden, weight, bias, computed.targets, saved, gathered(grad_log_probs).contiguous(),
                grad_entropy, options, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        if d_hidden is not None and computed.rows is not None:
            d_hidden = torch.zeros_like(hidden).index_copy_(0, computed.rows, d_hidden)
    if need_hidden and d_hidden is None:
        d_hidden = torch.zeros_like(hidden)
    if need_weight and d_weight is None:
        d_weight = torch.zeros_like(weight)
    if need_bias and d_bias is None:
        d_bias = torch.zeros_like(bias)
    return (empty_output(hidden) if d_hidden is None else d_hidden, empty_output(weight) if d_weight is None else d_weight,
            empty_output(hidden) if d_bias is None else d_bias)


_backward_op = torch.library.custom_op("fastpref::linear_logprobs_backward", mutates_args=())(_backward_impl)


@_backward_op.register_fake
def _backward_fake(hidden, weight, bias, targets, rows, lse, miss, entropy, direction, grad_log_probs,
                   grad_entropy, ignore_index, num_kept, backend, logit_scale, softcap, temperature, outputs,
                   scratch_bytes, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, ignore_index, num_kept, backend, logit_scale, softcap, temperature,
     outputs, scratch_bytes, _fold, _check) = inputs
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, rows, lse, miss, direction = output
    ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, miss, entropy, direction)
    ctx.arguments = (ignore_index, num_kept, backend, logit_scale, softcap, temperature, outputs, scratch_bytes)
    ctx.mark_non_differentiable(log_sum_sq_probs, mean_logits, is_top1, rows, lse, miss, direction)
    # entropy is often asked for as a metric only: its gradient then stays None, not zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_log_probs, grad_entropy, *_non_differentiable):
    hidden, weight, bias, targets, rows, lse, miss, entropy, direction = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_log_probs is None:
        grad_log_probs = torch.zeros(hidden.shape[0], dtype=lse.dtype, device=hidden.device)
    d_hidden, d_weight, d_bias = torch.ops.fastpref.linear_logprobs_backward(
        hidden, weight, bias, targets, rows, lse, miss, entropy, direction, grad_log_probs, grad_entropy,
        *ctx.arguments, need_hidden, need_weight, need_bias)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias else None) + (None,) * (len(ctx.needs_input_grad) - 3)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    outputs: Optional[Sequence[str]] = None,
    num_kept: Optional[int] = None,
    backend: str = "auto",
    scratch_bytes: Optional[int] = None,
    check: bool = False,
):
    """Log-probability of each target token (and TRL's per-token outputs), without the [N x V] logits.

    Args:
        hidden: [N, H] final hidden states (float16, bfloat16, float32; float64 on the torch
            backend), one row per token.
        weight: [V, H] LM-head weight, same dtype and device as `hidden`.
        targets: [N] integer token ids in [0, V), or `ignore_index` for positions that do not
            count (prompt, padding).
        bias: optional [V] LM-head bias.
        ignore_index: target value marking ignored positions.
        logit_scale, softcap, temperature: the logit transform, in TRL's order:
            z = (W h + b) * logit_scale, then softcap * tanh(z / softcap) when softcap is set,
            then z / temperature (softcap > 0, temperature > 0).
        outputs: None to get the [N] log-probs tensor; or a tuple of names among
            ``("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")`` to get a
            :class:`LinearLogprobsOutput` with those (and the log-probs) computed in the same pass.
        num_kept: the number of targets that are not ignore_index, when the caller knows it on the
            host (a packed layout does): only those rows are computed, found on the device without
            a synchronisation. None computes every row (ignored ones zeroed first: they cost their
            FLOPs but give nothing); N says every target counts.
        backend: "auto" (best for the device: triton on CUDA, torch elsewhere), "triton", "cuda"
            or "torch". See :func:`fastpref.available_backends`.
        scratch_bytes: the memory budget of the backward's scratch (None: the process-wide default,
            :func:`fastpref.set_scratch_bytes`).
        check: read the error flags at once (one synchronisation) and raise here; by default they
            are raised later, without stalling the device (see below).

    Returns:
        [N] float32 (float64 for float64 inputs) log softmax(z_n)[t_n], exactly 0 at ignored
        positions; or the :class:`LinearLogprobsOutput` of `outputs`. log_probs and entropy are
        differentiable with respect to hidden, weight and bias; when neither the weight nor the
        bias requires grad (frozen head, LoRA) no weight-gradient work is done, and without
        entropy the hidden gradient is folded into the forward (4NHV FLOPs in all).

    Bad values are never read on the host during the call: targets outside [0, V) and a wrong
    num_kept are flagged on the device and raise a ValueError naming the first bad position at
    the next call once the flags have reached the host, at :func:`fastpref.raise_pending_errors`,
    or here with ``check=True``; until then such rows give 0. NaN or inf in the inputs give NaN
    or inf log-probs and gradients, as log_softmax does (a GradScaler then skips the step), raised
    only with ``check=True`` or by ``raise_pending_errors(non_finite=True)``. Non-contiguous inputs are copied to contiguous memory first (for the weight,
    a V x H copy: pass a contiguous weight to avoid it). An enclosing autocast does not change
    the op's precision, forward or backward: it computes in its inputs' dtype (cast them to choose).

    A weight (and bias) that is a DTensor sharded on the vocabulary (``Shard(0)`` on one mesh
    dimension, Replicate on any other: a tensor-parallel head) is computed vocabulary-parallel:
    each process streams its own rows, one all_gather merges the per-row statistics, and every
    process gets the whole vocabulary's outputs; the weight's gradient comes back sharded like it,
    the hidden one whole (see :mod:`fastpref.vocab_parallel`). This path runs eagerly.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    transform = LogitTransform.build(logit_scale, softcap, temperature)
    extra = check_outputs(outputs)
    if num_kept is not None and (not isinstance(num_kept, int) or isinstance(num_kept, bool)
                                 or not 0 <= num_kept <= hidden.shape[0]):
        raise ValueError(f"num_kept must be None or an int in [0, N = {hidden.shape[0]}], got {num_kept!r}")
    budget = default_scratch_bytes() if scratch_bytes is None else check_scratch_bytes(scratch_bytes)
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    impl = _backends.resolve(backend, hidden.device)
    if hidden.dtype not in impl.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        raise TypeError(f"backend {impl.name!r} supports {supported}; hidden is {hidden.dtype}")

    if any(isinstance(value, DTensor) for value in (hidden, weight, bias, targets)):
        from .vocab_parallel import vocabulary_parallel_logprobs  # it builds on this module's helpers

        flags = [name in extra for name in EXTRA_OUTPUTS]
        results = vocabulary_parallel_logprobs(
            hidden, weight, bias, targets, ignore_index=ignore_index,
            num_kept=_UNKNOWN if num_kept is None else num_kept, impl=impl,
            options=_options(transform.logit_scale, transform.softcap, transform.temperature, flags, budget),
            check=check)
    else:
        results = _call_op(hidden, weight, bias, targets, ignore_index, num_kept, impl, transform, extra, budget,
                           check)
    if outputs is None:
        return results[0]
    return LinearLogprobsOutput(results[0], **{name: results[1 + EXTRA_OUTPUTS.index(name)] for name in extra})


def _call_op(hidden, weight, bias, targets, ignore_index, num_kept, impl, transform, extra, budget, check):
    fold_hidden_gradient = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                            and (bias is None or not bias.requires_grad) and "entropy" not in extra)
    return torch.ops.fastpref.linear_logprobs(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        targets.long().contiguous(), ignore_index, _UNKNOWN if num_kept is None else num_kept, impl.name,
        transform.logit_scale, transform.softcap, transform.temperature, [name in extra for name in EXTRA_OUTPUTS], budget,
        fold_hidden_gradient, check)
