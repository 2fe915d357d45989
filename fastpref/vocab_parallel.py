"""The op on a vocabulary-parallel LM head: a weight sharded by vocabulary rows over processes.

Tensor parallelism (torch's ``ColwiseParallel`` on the head, transformers' ``tp_plan``) leaves the
LM head a DTensor with placement ``Shard(0)`` on one mesh dimension of K processes: process k
holds the rows [o_k, o_k + V_k) of W (and of b), V_k = ceil(V / K) on the first processes (torch's
uneven sharding). Every process streams its own slice with the usual backend, on the same hidden
rows and targets, and gets the per-row statistics of its slice relative to its largest logit m_k
(the quantities of :mod:`fastpref.backends.online_softmax`): with S_k = exp(lse_k - m_k) the
slice's sum of exponentials, p^k its softmax, t the target,

    sum_excl_k   = S_k miss_k  where k owns t,  S_k elsewhere     (sum_{v != t} exp(z_v - m_k))
    target_k     = z_t = logp_k + lse_k where k owns t, 0 elsewhere
    sum_all_k    = S_k,   shifted_k = S_k (lse_k - entropy_k - m_k)           (entropy)
    sum_sq_k     = exp(2 (lse_k - m_k) + log_sum_sq_probs_k)                   (log sum p^2)
    logit_sum_k  = V_k mean_logits_k                                           (mean logit)
    max_before_k = m_k where the slice lies before t, -inf after it; on the owner -inf when t is
                   its slice's first maximum, +inf when not                    (is_top1)

One all_gather over the mesh dimension brings every process the [K, F, M] statistics (F = 4 to 9
numbers per row and process, float32; float64 for float64 inputs: the above and the target
itself), and merge_vocabulary_parts merges them exactly as it merges the vocabulary blocks of one
process: every process gets the whole vocabulary's log-probs and outputs. An all_gather rather
than a max all-reduce followed by sum all-reduces: one collective instead of two dependent ones,
the merge already written, and at these sizes (K F M 4 bytes: 128 KiB for M = 4096, K = 2, F = 4)
latency, not bandwidth, is its cost. The gathered targets cost one number per row and catch, on
the device, processes that do not hold the same rows (see _report_differing_targets): every
process of the mesh dimension must pass the same hidden rows and targets.

A process that does not own row n's target streams its slice with column 0 standing in as the
target (so the backends' inputs stay valid), and its statistics are rebuilt as above. The backward
is the backends' own, local to the slice, with the merged lse and entropy; the stand-in's entry
g miss must be its true -g p_0, so the saved miss of such a row is -p_0 = -exp(z_0 - lse):

    dL/dz_{n,v} (v in slice k) as in fastpref.linear_logprobs, with the global p, lse and entropy
    dL/dW_k, dL/db_k: the slice's own (sharded like the weight)
    dL/dh_n = sum_k (dL/dx_{n,v in k}) W_k                  (one all_reduce of [N, H] over the mesh)

The frozen head's one-pass form (the hidden gradient folded into the forward) is not used here:
its direction mixes the slices' softmaxes before they are merged, so a sharded head always
recomputes the logits in the backward (6 N H V / K FLOPs per process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import deferred_errors
from .backends import EXTRA_OUTPUTS, Backend, HeadOptions
from .backends.online_softmax import merge_vocabulary_parts
from .linear_logprobs import computed_rows, empty_output, spread_rows, report_errors

# A target no local vocabulary index can equal: the process's own calls ignore what it marks.
_LOCAL_IGNORE = -1


@dataclass(frozen=True)
class VocabularySlice:
    """This process's rows [offset, offset + size) of a V-row head sharded over `processes`."""

    group: dist.ProcessGroup
    index: int
    processes: int
    offset: int
    size: int
    vocab: int

    def local_targets(self, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Targets in the slice's indices: its own as [0, size); another slice's as the stand-in 0;
        out-of-range ones as `size` (never valid: they count for nothing); ignored as -1."""
        local = targets - self.offset
        owned = (local >= 0) & (local < self.size)
        valid = (targets >= 0) & (targets < self.vocab)
        local = torch.where(owned, local, torch.where(valid, 0, self.size))
        return torch.where(targets == ignore_index, _LOCAL_IGNORE, local)


def _placements_text(tensor: DTensor) -> str:
    return f"placements {tuple(tensor.placements)} on a mesh of shape {tuple(tensor.device_mesh.shape)}"


def vocabulary_slice(weight: DTensor) -> VocabularySlice:
    """This process's slice of a weight with Shard(0) on one mesh dimension
    and Replicate on the others; ValueError naming what is expected otherwise."""
    expected = ("expected Shard(0) (the vocabulary, as ColwiseParallel shards an LM head) on one mesh "
                "dimension and Replicate on the others")
    placements = tuple(weight.placements)
    sharded = [dim for dim, placement in enumerate(placements) if type(placement) is Shard and placement.dim == 0]
    others = [placement for dim, placement in enumerate(placements)
              if dim not in sharded and not isinstance(placement, Replicate)]
    if others or len(sharded) > 1:
        raise ValueError(f"weight has {_placements_text(weight)}: {expected}")
    if not sharded:
        raise ValueError(f"weight is a DTensor replicated on every mesh dimension ({_placements_text(weight)}): "
                         f"{expected}, or pass weight.to_local()")
    mesh_dim = sharded[0]
    mesh = weight.device_mesh
    processes, index, vocab = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim), weight.shape[0]
    chunk = math.ceil(vocab / processes)
    if chunk * (processes - 1) >= vocab:
        raise ValueError(f"weight has V = {vocab} rows over {processes} processes, which leaves a process "
                         f"without any (Shard(0) gives each ceil(V / {processes}) = {chunk}): expected "
                         f"V > {chunk * (processes - 1)}")
    offset = chunk * index
    size = min(chunk, vocab - offset)
    local_rows = weight.to_local().shape[0]
    if local_rows != size:
        raise ValueError(f"weight's local shard has {local_rows} rows where Shard(0) of V = {vocab} over "
                         f"{processes} processes gives process {index} {size}: {expected}")
    return VocabularySlice(mesh.get_group(mesh_dim), index, processes, offset, size, vocab)


def _local(name: str, value: Optional[torch.Tensor], weight: DTensor) -> Optional[torch.Tensor]:
    """hidden, targets (replicated) or bias (sharded like the weight) as this process's tensor."""
    if value is None:
        return None
    if name == "bias":
        if not isinstance(value, DTensor) or value.device_mesh != weight.device_mesh \
                or tuple(value.placements) != tuple(weight.placements):
            described = _placements_text(value) if isinstance(value, DTensor) else "a plain tensor"
            raise ValueError(f"bias must be sharded like the weight ({_placements_text(weight)}), got {described}")
        return value.to_local()
    if not isinstance(value, DTensor):
        return value
    if not all(isinstance(p, Replicate) for p in value.placements):
        raise ValueError(f"{name} must be a plain tensor or a replicated DTensor, got "
                         f"{_placements_text(value)} (a sequence-parallel {name} is not supported: gather it first)")
    return value.to_local()


# The statistics each output adds per row to the all_gather (see the module docstring).
_STATISTICS_OF_OUTPUT = {"entropy": 2, "log_sum_sq_probs": 1, "mean_logits": 1, "is_top1": 1}


def statistics_per_row(outputs) -> int:
    """F, the numbers per row and process the forward's all_gather carries: row max, sum without
    the target, target logit, those of the per-token `outputs` asked for, and the target itself."""
    return 4 + sum(_STATISTICS_OF_OUTPUT[name] for name in set(outputs) if name in _STATISTICS_OF_OUTPUT)


def _statistics(result, owned: torch.Tensor, targets: torch.Tensor, piece: VocabularySlice,
                options: HeadOptions) -> torch.Tensor:
    """[F, M] the slice's statistics relative to its largest logit (see the module docstring), and
    last the targets (exact in float32 below 2^24), which every process must share."""
    row_max = result.row_max
    log_scale = result.lse - row_max
    scale = log_scale.exp()
    zero = torch.zeros((), dtype=scale.dtype, device=scale.device)
    rows = [row_max, torch.where(owned, result.miss * scale, scale),
            torch.where(owned, result.logp + result.lse, zero)]
    if "entropy" in options.outputs:
        rows += [scale, scale * (log_scale - result.entropy)]
    if "log_sum_sq_probs" in options.outputs:
        rows.append((2 * log_scale + result.log_sum_sq_probs).exp())
    if "mean_logits" in options.outputs:
        rows.append(result.mean_logits * piece.size)
    if "is_top1" in options.outputs:
        infinity = torch.full_like(scale, float("inf"))
        before = torch.where(targets >= piece.offset + piece.size, row_max, -infinity)
        rows.append(torch.where(owned, torch.where(result.is_top1, -infinity, infinity), before))
    rows.append(targets.to(scale.dtype))
    return torch.stack(rows)


def _merge(parts: torch.Tensor, options: HeadOptions, vocab: int):
    """The merged ForwardResult from every process's [F, M] statistics, [K, F, M] (the targets
    last, not merged)."""
    names = []
    if "entropy" in options.outputs:
        names += ["sum_all", "shifted"]
    names += [name for output, name in (("log_sum_sq_probs", "sum_sq"), ("mean_logits", "logit_sum"),
                                        ("is_top1", "max_before")) if output in options.outputs]
    return merge_vocabulary_parts(parts[:, 0], parts[:, 1], parts[:, 2], vocab=vocab,
                                  **{name: parts[:, 3 + i] for i, name in enumerate(names)})


def _gather(statistics: torch.Tensor, piece: VocabularySlice) -> torch.Tensor:
    """[K, F, M]: every process's statistics, in slice order (one all_gather)."""
    gathered = statistics.new_empty((piece.processes * statistics.shape[0], statistics.shape[1]))
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # its older name
    all_gather(gathered, statistics.contiguous(), group=piece.group)
    return gathered.view(piece.processes, *statistics.shape)


def _report_differing_targets(targets: torch.Tensor, piece: VocabularySlice, check: bool) -> None:
    """Flag (deferred, or at once with `check`) rows whose target is not the same on every process
    of the mesh dimension, [K, M]: their processes hold different rows (say, data-parallel ones
    passing a weight FSDP2 shards over them), and the merge would mix them."""
    differing = (targets != targets[:1]).any(dim=0)
    processes = piece.processes

    def describe(count: int, first: int) -> str:
        return (f"the {processes} processes over which the weight is sharded on the vocabulary (Shard(0)) hold "
                f"different targets at {count} computed rows, the first at row {first}: a vocabulary-parallel head "
                "needs the same hidden rows and targets on each of them (a weight that FSDP2 shards over "
                "data-parallel processes is not one: read it inside its module's forward, where it is gathered)")

    deferred_errors.report_any(differing, describe, check)


class _VocabularyParallelLogprobs(torch.autograd.Function):
    """linear_logprobs on this process's slice, merged over the mesh; d_hidden summed over it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, piece: VocabularySlice, ignore_index: int, num_kept: int,
                impl: Backend, options: HeadOptions, check: bool):
        deferred_errors.raise_landed_errors()
        num_rows = hidden.shape[0]
        local_targets = piece.local_targets(targets, ignore_index)
        computed = computed_rows(hidden, piece.size, local_targets, _LOCAL_IGNORE, num_kept)
        adt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if computed.hidden.shape[0]:
            with torch.autocast(hidden.device.type, enabled=False):  # in the inputs' dtype, as the op
                result = impl.forward(computed.hidden, weight, bias, computed.targets, options,
                                      fold_hidden_gradient=False)
            slice_targets = targets if computed.rows is None else targets.index_select(0, computed.rows)
            owned = computed.counts & (slice_targets >= piece.offset) & (slice_targets < piece.offset + piece.size)
            parts = _gather(_statistics(result, owned, slice_targets, piece, options), piece)
            _report_differing_targets(parts[:, -1], piece, check)
            merged = _merge(parts, options, piece.vocab)
            # the stand-in target's entry g miss in the backward must be its -g p_0
            stand_in = -(result.logp + result.lse - merged.lse).exp()
            miss = torch.where(owned, merged.miss, stand_in)
            values = {"log_probs": merged.logp, **{name: getattr(merged, name) for name in options.outputs}}
            lse = merged.lse
        else:
            lse = miss = hidden.new_empty(0, dtype=adt)
            values = {name: hidden.new_empty(0, dtype=torch.bool if name == "is_top1" else adt)
                      for name in ("log_probs", *options.outputs)}
        outputs = [spread_rows(values[name], computed, num_rows) if name in values
                   else empty_output(hidden, torch.bool if name == "is_top1" else adt)
                   for name in ("log_probs", *EXTRA_OUTPUTS)]

        report_errors(hidden, targets, outputs[0], ignore_index, piece.vocab, num_kept, check)

        rows = empty_output(targets) if computed.rows is None else computed.rows
        ctx.save_for_backward(hidden, weight, bias, local_targets, rows, lse, miss, outputs[1])
        ctx.piece, ctx.num_kept, ctx.impl, ctx.options = piece, num_kept, impl, options
        ctx.mark_non_differentiable(*outputs[2:])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_non_differentiable):
        hidden, weight, bias, local_targets, rows, lse, miss, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        options, piece = ctx.options, ctx.piece
        if grad_log_probs is None:
            grad_log_probs = torch.zeros(hidden.shape[0], dtype=lse.dtype, device=hidden.device)
        transform = options.transform
        d_hidden, d_weight, d_bias = torch.ops.fastpref.linear_logprobs_backward(
            hidden, weight, bias, local_targets, rows, lse, miss, entropy, hidden.new_empty(0),
            grad_log_probs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(), _LOCAL_IGNORE,
            ctx.num_kept, ctx.impl.name, transform.logit_scale, transform.softcap, transform.temperature,
            [name in options.outputs for name in EXTRA_OUTPUTS], options.scratch_bytes,
            need_hidden, need_weight, need_bias)
        if need_hidden:
            dist.all_reduce(d_hidden, group=piece.group)
        return (d_hidden if need_hidden else None, d_weight if need_weight else None,
                d_bias if need_bias else None) + (None,) * (len(ctx.needs_input_grad) - 3)


def vocabulary_parallel_logprobs(hidden, weight: DTensor, bias, targets, *, ignore_index: int, num_kept: int,
                                 impl: Backend, options: HeadOptions, check: bool) -> Tuple[torch.Tensor, ...]:
    """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] on every process (an
    output not asked for is empty), for a weight sharded on the vocabulary; inputs validated by
    fastpref.linear_logprobs. Gradients flow to the weight's (and bias') shards through to_local
    and come back sharded like them; hidden's is whole, summed over the mesh dimension."""
    if not isinstance(weight, DTensor):
        raise ValueError("bias, hidden or targets is a DTensor but weight is not: expected the weight "
                         "sharded on the vocabulary (Shard(0)) and the others replicated or plain")
    piece = vocabulary_slice(weight)
    local_hidden = _local("hidden", hidden, weight)
    local_targets = _local("targets", targets, weight)
    local_bias = _local("bias", bias, weight)
    return _VocabularyParallelLogprobs.apply(
        local_hidden.contiguous(), weight.to_local().contiguous(),
        None if local_bias is None else local_bias.contiguous(), local_targets.long().contiguous(), piece,
        ignore_index, num_kept, impl, options, check)


__all__ = ["statistics_per_row", "vocabulary_parallel_logprobs", "vocabulary_slice", "VocabularySlice"]
