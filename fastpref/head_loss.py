"""The LM head and the preference loss as one op whose forward also computes the gradients.

A preference loss is a sum of terms of one pair each (of one sequence, for KTO): the gradient
g_n = dL/dlogp_n of a response token depends only on the log-probs of its own pair. So once the
log-probs of a group of whole pairs are known, so are their tokens' gradients, and the backward of
that group can run at once, from the logits the forward just computed instead of recomputing them:

    for each group of pairs, with its response rows h (about group_rows of them):
        pass 1:  x = h W^T + b block by block, kept in a store; the online softmax gives logp
        g      = dL/dlogp of the group's tokens (the loss's own gradient, fastpref.loss_spec)
        pass 2:  from the stored x, dz = J (g (1[v = t] - p)), dW += dz^T h, db += sum dz, dh = dz W

6NHV FLOPs for a trainable head instead of the 8NHV of a forward and a backward that recomputes
the logits, with group_rows x V float32 logits held at a time, whatever N. The backward then only
scales the saved gradients by dL_total/dL (in place: a second backward through the same graph is
refused, as PyTorch's own chunked cross-entropy refuses it).

Where it runs: the torch backend (any device) and the CUDA backend (cuBLAS GEMMs and its slab
epilogues, csrc/). By default only a CPU takes it, in groups of GROUP_ROWS rows (256 MiB of
logits at V = 262,144). On a GPU it is asked for (PreferenceLoss(gradients_in_forward=True)) and
trades memory for time: groups of GPU_GROUP_ROWS rows hold 2,048 x V float32 logits and as many
logit gradients in the inputs' dtype (1.5 GiB at V = 131,072), plus a float32 weight gradient
[V, H] when there is more than one group; the two-op path (:func:`fastpref.linear_logprobs`,
then the fused pair loss) stays within the scratch budget.

Groups read the layout on the host (one synchronisation per call on a GPU) and cannot be traced:
torch.compile keeps the two-op path, which reads nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.distributed.tensor import DTensor

from . import backends as _backends
from . import deferred_errors
from .backends import HeadOptions
from .layout import PackedLayout
from .linear_logprobs import report_errors
from .logit_transform import LogitTransform
from . import loss_types
from .loss_spec import LossSpec

# Response rows per group: fewer make the weight gradient's matmuls (their inner dimension is the
# group's rows) too small for a CPU's GEMM rate (docs/benchmarks.md).
GROUP_ROWS = 256
# On a GPU, enough rows that the weight gradient's GEMM (K = the group's rows) stays compute-bound
# while it adds into its float32 accumulator (fastpref plan --design groups).
GPU_GROUP_ROWS = 2048


def default_group_rows(device: torch.device) -> int:
    return GROUP_ROWS if device.type == "cpu" else GPU_GROUP_ROWS


def loss_units(layout: PackedLayout) -> List[List[int]]:
    """The sequences whose losses depend on each other only: each pair's two, or, where sequences
    are in several pairs, every sequence linked to another by a pair (a prompt group's responses);
    each sequence alone in an unpaired layout. In order of their first sequence. Reads the layout on
    the host."""
    if not layout.is_paired:
        return [[sequence] for sequence in range(layout.num_sequences)]
    pairs = list(zip(layout.chosen_index.tolist(), layout.rejected_index.tolist()))
    if not layout.shares_sequences:
        return [sorted(pair) for pair in pairs]
    root = list(range(layout.num_sequences))

    def find(sequence):
        while root[sequence] != sequence:
            root[sequence] = root[root[sequence]]
            sequence = root[sequence]
        return sequence

    for chosen, rejected in pairs:
        root[find(chosen)] = find(rejected)
    units: Dict[int, List[int]] = {}
    for sequence in range(layout.num_sequences):
        units.setdefault(find(sequence), []).append(sequence)
    return sorted(units.values())


def row_groups(layout: PackedLayout, kept: torch.Tensor, rows_per_group: int = GROUP_ROWS) -> List[torch.Tensor]:
    """The kept rows of whole units (:func:`loss_units`), unit after unit, cut into groups of about
    rows_per_group rows (a unit larger than that is a group of its own). Reads the layout on the host."""
    kept_rows = kept.nonzero().squeeze(1)
    sequence_of_row = layout.sequence_ids.index_select(0, kept_rows)
    rows_of_sequence = torch.bincount(sequence_of_row, minlength=layout.num_sequences).tolist()
    units = loss_units(layout)
    group_of_sequence = [0] * layout.num_sequences
    group, size = 0, 0
    for unit in units:
        rows = sum(rows_of_sequence[sequence] for sequence in unit)
        if size and size + rows > rows_per_group:
            group, size = group + 1, 0
        for sequence in unit:
            group_of_sequence[sequence] = group
        size += rows
    group_of_row = torch.tensor(group_of_sequence, dtype=torch.long).index_select(0, sequence_of_row.cpu())
    order = torch.argsort(group_of_row, stable=True)
    sizes = torch.bincount(group_of_row, minlength=group + 1).tolist()
    return [rows for rows in kept_rows.index_select(0, order.to(kept_rows.device)).split(sizes) if rows.numel()]


class _HeadPreferenceLoss(torch.autograd.Function):
    """(loss, parts [T, P] in spec.loss_types' order, sequence_logps) forward; the gradients it
    computed, scaled, backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, layout: PackedLayout, reference_logps, spec: LossSpec, kl,
                ignore_index: int, transform: LogitTransform, check: bool, backend: str, group_rows: int):
        deferred_errors.raise_landed_errors()
        impl = grouped_backend(backend, hidden.device)
        vocab = weight.shape[0]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        kept = targets != ignore_index
        counts = kept & (targets >= 0) & (targets < vocab)
        # rows of groups still to come hold a finite stand-in: a group's gradient depends on its own pairs only
        token_logp = torch.where(kept, -1.0, 0.0).to(dtype)

        def token_gradient(rows: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
            counted = counts.index_select(0, rows)
            token_logp[rows] = torch.where(counted, logp, 0.0)
            grad = loss_types.token_gradient(token_logp, layout, reference_logps, spec, kl)
            return torch.where(counted, grad.index_select(0, rows), 0.0)

        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            logp, d_hidden, d_weight, d_bias = impl.forward_backward_by_groups(
                hidden, weight, bias, torch.where(counts, targets, 0), row_groups(layout, kept, group_rows),
                token_gradient, HeadOptions(transform), need_hidden, need_weight, need_bias,
                store_bytes=group_rows * vocab * dtype.itemsize)
            terms = loss_types.loss_terms(token_logp, layout, reference_logps, spec, kl)

        report_errors(hidden, targets, logp, ignore_index, vocab, layout.num_response_tokens, check)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        parts = torch.stack([terms.parts[name] for name in spec.loss_types])
        ctx.mark_non_differentiable(parts, terms.sequence_logps)
        ctx.consumed = False
        return terms.loss, parts, terms.sequence_logps

    @staticmethod
    def backward(ctx, grad_loss, *_non_differentiable):
        if ctx.consumed:
            raise RuntimeError(
                "the preference loss computed with its gradients (PreferenceLoss(gradients_in_forward=...)) "
                "hands them to its first backward: a second backward through the same loss "
                "(retain_graph=True) needs PreferenceLoss(..., gradients_in_forward=False)")
        ctx.consumed = True
        # in place: the saved gradients (one as large as the weight) are not copied
        scaled = [None if gradient is None else gradient.mul_(grad_loss.to(gradient.dtype))
                  for gradient in ctx.saved_tensors]
        return (*scaled,) + (None,) * (len(ctx.needs_input_grad) - len(scaled))


def grouped_logprobs(hidden, weight, bias, targets, layout: PackedLayout, *, ignore_index: int,
                     transform: LogitTransform, check: bool, backend: str = "auto",
                     group_rows: Optional[int] = None) -> torch.Tensor:
    """[N] log-probs of the response targets (0 elsewhere), bit for bit those that
    head_preference_loss computes with the same arguments: the same groups through the same first
    pass, without the gradients. What a reference pass runs when the policy's takes this path, so
    that identical weights give identical log-probs."""
    deferred_errors.raise_landed_errors()
    rows = default_group_rows(hidden.device) if group_rows is None else group_rows
    impl = grouped_backend(backend, hidden.device)
    vocab = weight.shape[0]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    kept = targets != ignore_index
    counts = kept & (targets >= 0) & (targets < vocab)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        logp, *_gradients = impl.forward_backward_by_groups(
            hidden, weight, bias, torch.where(counts, targets, 0), row_groups(layout, kept, rows), None,
            HeadOptions(transform), False, False, False, store_bytes=rows * vocab * dtype.itemsize)
    report_errors(hidden, targets, logp, ignore_index, vocab, layout.num_response_tokens, check)
    return torch.where(counts, logp, 0.0)


def grouped_backend(backend: str, device: torch.device) -> Optional[_backends.Backend]:
    """The backend whose forward_backward_by_groups runs this call: `backend` itself, or under
    "auto" the best one on `device` that has one (None where there is none)."""
    def has_pass(impl: _backends.Backend) -> bool:
        return impl.forward_backward_by_groups is not None

    if backend == "auto":
        return _backends.best_backend(device, has_pass)
    impl = _backends.resolve(backend, device)
    return impl if has_pass(impl) else None


def unavailable_reason(backend: str, hidden: torch.Tensor, weight: torch.Tensor, spec: LossSpec,
                       token_metrics: bool, requested: bool = False, trainable: Optional[bool] = None
                       ) -> Optional[str]:
    """None when head_preference_loss can compute this call, else why not. Unless `requested`
    (gradients_in_forward=True), only a CPU's torch backend takes it. `trainable`: whether the
    head is trained (None: gradients are enabled and weight.requires_grad)."""
    if torch.compiler.is_compiling():
        return "it reads the layout on the host, which a compiled graph cannot (the two-op path is traced)"
    if spec.couples_pairs:
        return (f"loss types {list(spec.loss_types)} couple the pairs (AOT sorts them), so a group's gradients "
                "need every group's log-probs")
    if spec.use_weighting:
        return "WPO's weights (use_weighting) read the op's per-token log_sum_sq_probs, which it does not compute"
    if trainable is None:
        trainable = torch.is_grad_enabled() and weight.requires_grad
    if not trainable:
        return "it computes the gradients of a trainable head (weight.requires_grad, gradients enabled)"
    if token_metrics:
        return "it computes no per-token outputs (token_metrics=True)"
    if isinstance(weight, DTensor):
        return "a vocabulary-parallel (DTensor) head takes the two-op path"
    if requested:
        if grouped_backend(backend, hidden.device) is None:
            return (f"backend {backend!r} has no such pass on a {hidden.device.type} device "
                    "(the 'torch' backend has, and the 'cuda' one on a GPU)")
        return None
    if hidden.device.type != "cpu" or _backends.resolve(backend, hidden.device).name != "torch":
        return ("by default it runs on the CPU's torch backend; elsewhere it holds a group of rows' logits "
                "(gradients_in_forward=True asks for it)")
    return None


def head_preference_loss(hidden, weight, bias, targets, layout: PackedLayout, reference_logps, spec: LossSpec, kl,
                         *, ignore_index: int, transform: LogitTransform, check: bool, backend: str = "auto",
                         group_rows: Optional[int] = None):
    """(loss, parts, sequence_logps) of `spec` on the head's log-probs of the response targets
    (ignore_index elsewhere), computed with the gradients (see the module docstring) by `backend`
    in groups of about group_rows response rows (None: default_group_rows); the inputs are
    validated by fastpref.PreferenceLoss."""
    rows = default_group_rows(hidden.device) if group_rows is None else group_rows
    loss, parts, sequence_logps = _HeadPreferenceLoss.apply(hidden, weight, bias, targets, layout, reference_logps,
                                                            spec, kl, ignore_index, transform, check, backend, rows)
    return loss, dict(zip(spec.loss_types, parts)), sequence_logps
