"""Batch layouts for preference losses.

fastpref computes on a *packed* token stream: every sequence of the batch back to back, no
padding. :class:`PackedLayout` describes that stream:

    cu_seqlens     [S + 1]  sequence s spans tokens cu_seqlens[s] : cu_seqlens[s + 1]
    response_mask  [N]      True where the token's target counts (response, not prompt)
    chosen_index   [P]      for paired losses: the sequence holding pair p's chosen response
    rejected_index [P]      ... and the one holding its rejected response (every sequence is in
                            a pair; one may be in several, as a prompt's K responses compared
                            pairwise are: its log-prob is computed once, and its gradient sums
                            over the pairs)
    desirable      [S]      for unpaired losses (KTO): True for desirable sequences

Token n's hidden state predicts targets[n] (callers shift labels, as for any causal LM loss).

Callers with the padded [2B, T] layout of TRL and Liger-Kernel (chosen rows first, then the
rejected rows in the same order, -100 outside the responses) convert it with :func:`pack_padded`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from .transfer import to_device


def _as_index(name: str, value, device=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, device=device)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    return value.long()


@dataclass
class PackedLayout:
    """Where each sequence lies in the packed stream, which tokens count, and how they pair up.

    Build it with :meth:`paired` or :meth:`unpaired`, which validate everything once (with one
    host synchronisation: build it on the CPU, where that costs nothing, and move it with
    :meth:`to`): afterwards the loss can trust the layout. ``num_response_tokens`` (the number of
    True entries of response_mask) is then known on the host, so the loss computes exactly those
    rows without reading anything back from the device.
    """

    cu_seqlens: torch.Tensor
    response_mask: torch.Tensor
    chosen_index: Optional[torch.Tensor] = None
    rejected_index: Optional[torch.Tensor] = None
    desirable: Optional[torch.Tensor] = None
    lengths: torch.Tensor = field(init=False)
    sequence_ids: torch.Tensor = field(init=False)
    num_response_tokens: int = field(init=False)
    # True when a sequence is in several pairs (the responses of a prompt group, compared pairwise)
    shares_sequences: bool = field(init=False, default=False)

    def __post_init__(self):
        cu = _as_index("cu_seqlens", self.cu_seqlens)
        mask = self.response_mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise TypeError("response_mask must be a 1-D bool tensor over the packed tokens")
        if cu.numel() < 2:
            raise ValueError("cu_seqlens must hold at least one sequence: [0, end_0, ...]")
        cu = cu.to(mask.device)
        self.cu_seqlens = cu
        num_tokens, num_seqs = mask.shape[0], cu.numel() - 1
        seq_lens = cu[1:] - cu[:-1]
        first, last, non_increasing, self.num_response_tokens = torch.stack(
            [cu[0], cu[-1], (seq_lens <= 0).sum(), mask.sum()]).tolist()
        if first != 0 or last != num_tokens:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at the number of tokens {num_tokens}, "
                f"got {first} ... {last}")
        if non_increasing:
            raise ValueError("cu_seqlens must be strictly increasing: every sequence needs a token")
        self.sequence_ids = torch.repeat_interleave(
            torch.arange(num_seqs, device=mask.device), seq_lens, output_size=num_tokens)
        self.lengths = torch.zeros(num_seqs, dtype=torch.long, device=mask.device).index_add_(
            0, self.sequence_ids, mask.long())

        paired = self.chosen_index is not None or self.rejected_index is not None
        if paired == (self.desirable is not None):
            raise ValueError(
                "a layout is either paired (chosen_index and rejected_index) or unpaired "
                "(desirable), exactly one of the two")
        if paired:
            if self.chosen_index is None or self.rejected_index is None:
                raise ValueError("a paired layout needs both chosen_index and rejected_index")
            self.chosen_index = _as_index("chosen_index", self.chosen_index).to(mask.device)
            self.rejected_index = _as_index("rejected_index", self.rejected_index).to(mask.device)
            if self.chosen_index.numel() != self.rejected_index.numel():
                raise ValueError(
                    f"chosen_index and rejected_index must have one entry per pair, got "
                    f"{self.chosen_index.numel()} and {self.rejected_index.numel()}")
            if self.chosen_index.numel() == 0:
                raise ValueError("a paired layout needs at least one pair")
            used = torch.cat([self.chosen_index, self.rejected_index])
            bad = used[(used < 0) | (used >= num_seqs)]
            if bad.numel():
                raise ValueError(
                    f"pairs must point at sequences in [0, {num_seqs}); got sequence {int(bad[0])}")
            if (self.chosen_index == self.rejected_index).any():
                same = int((self.chosen_index == self.rejected_index).nonzero()[0])
                raise ValueError(f"pair {same} has the same sequence as chosen and as rejected")
            distinct = torch.unique(used).numel()
            if distinct != num_seqs:
                raise ValueError(
                    f"every sequence must belong to a pair, as chosen or as rejected: {num_seqs} sequences, "
                    f"{num_seqs - distinct} in no pair")
            self.shares_sequences = used.numel() != num_seqs
        else:
            desirable = self.desirable
            if not isinstance(desirable, torch.Tensor):
                desirable = torch.as_tensor(desirable)
            if desirable.dtype != torch.bool or desirable.shape != (num_seqs,):
                raise ValueError(
                    f"desirable must be a bool tensor with one label per sequence ({num_seqs}), "
                    f"got {desirable.dtype} of shape {tuple(desirable.shape)}")
            self.desirable = desirable.to(mask.device)
            used = torch.arange(num_seqs, device=mask.device)

        empty = used[self.lengths[used] == 0]
        if empty.numel():
            raise ValueError(
                f"sequence {int(empty[0])} has no response tokens: its log-probability is empty "
                "(drop the pair, or widen the response mask)")

    def to(self, device) -> "PackedLayout":
        """The same layout on `device`, without validating it again (no synchronisation)."""
        moved = copy.copy(self)
        for name in ("cu_seqlens", "response_mask", "chosen_index", "rejected_index", "desirable", "lengths",
                     "sequence_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(moved, name, to_device(value, device))
        return moved

    @classmethod
    def paired(cls, cu_seqlens, response_mask, chosen_index, rejected_index) -> "PackedLayout":
        return cls(cu_seqlens, response_mask, chosen_index=chosen_index, rejected_index=rejected_index)

    @classmethod
    def unpaired(cls, cu_seqlens, response_mask, desirable) -> "PackedLayout":
        return cls(cu_seqlens, response_mask, desirable=desirable)

    @property
    def num_tokens(self) -> int:
        return self.response_mask.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def is_paired(self) -> bool:
        return self.chosen_index is not None

    @property
    def num_pairs(self) -> int:
        return self.chosen_index.numel() if self.is_paired else 0


@dataclass
class PackedBatch:
    """A padded batch turned packed: only the response positions, back to back."""

    hidden: torch.Tensor
    targets: torch.Tensor
    layout: PackedLayout
    positions: torch.Tensor  # [N] flat indices into the padded [rows * T] positions

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """Apply the same packing to another [rows, T, ...] tensor (e.g. reference hidden states)."""
        return padded.reshape(-1, *padded.shape[2:]).index_select(0, self.positions)


def pack_padded(hidden: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                desirable: Optional[torch.Tensor] = None) -> PackedBatch:
    """Convert the padded layout of TRL / Liger-Kernel into fastpref's packed layout.

    Args:
        hidden: [rows, T, H] hidden states. For paired losses rows = 2B: the B chosen rows
            first, then the B rejected rows in the same order.
        targets: [rows, T] target ids aligned with hidden (already shifted), `ignore_index` at
            prompt and padding positions.
        desirable: for unpaired losses (KTO), one bool label per row; then rows are not paired.

    Only positions whose target counts are kept: prompt and padding tokens carry no loss, so the
    packed stream needs nothing else. Gradients flow back to the padded `hidden`.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [rows, T, H] in the padded layout, got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"targets must be [rows, T] = {tuple(hidden.shape[:2])} like hidden, got {tuple(targets.shape)}")
    rows = hidden.shape[0]
    if desirable is None and (rows == 0 or rows % 2):
        raise ValueError(f"the paired padded layout needs 2B rows (B chosen, then B rejected), got {rows}")
    kept = (targets != ignore_index).reshape(-1)
    positions = kept.nonzero().squeeze(1)
    counts = (targets != ignore_index).sum(dim=1)
    cu_seqlens = torch.zeros(rows + 1, dtype=torch.long, device=targets.device)
    cu_seqlens[1:] = counts.cumsum(0)
    empty = (counts == 0).nonzero()
    if empty.numel():
        raise ValueError(f"row {int(empty[0])} has no target outside ignore_index: no response tokens")
    response_mask = torch.ones(positions.numel(), dtype=torch.bool, device=targets.device)
    if desirable is None:
        half = rows // 2
        layout = PackedLayout.paired(cu_seqlens, response_mask,
                                     torch.arange(half), torch.arange(half, rows))
    else:
        layout = PackedLayout.unpaired(cu_seqlens, response_mask, desirable)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return PackedBatch(flat_hidden, targets.reshape(-1).index_select(0, positions), layout, positions)
