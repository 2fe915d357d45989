"""One padding-free forward for a batch of preference pairs.

Plain packing puts [prompt | chosen] and [prompt | rejected] of every pair back to back, each a
segment of its own: positions restart at 0 per segment and attention is block-diagonal causal.

Prefix sharing puts [prompt | chosen | rejected] as one unit: the prompt is computed once, the
rejected tokens attend to the prompt and to themselves but never to the chosen ones, and their
positions continue from the prompt's end, so every token sees exactly what it would see in its
own unshared sequence.

Either way the loss only ever reads the hidden states that predict response tokens: for a
response r of a prompt of length p those sit at the prompt's last position and at r's own
positions but its last. In prefix sharing the prompt's last position predicts the first token of
both responses, so it is read twice (its gradient adds up, as it should).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..layout import PackedLayout
from ..transfer import to_device

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedPairs:
    input_ids: torch.Tensor       # [1, T] the packed stream
    position_ids: torch.Tensor    # [1, T]
    unit_ids: torch.Tensor        # [T] which segment (plain) or unit (shared) a token belongs to
    roles: torch.Tensor           # [T] PROMPT, CHOSEN or REJECTED
    loss_positions: torch.Tensor  # [N] stream positions whose hidden state predicts a response token
    targets: torch.Tensor         # [N] the response token each of them predicts
    layout: PackedLayout          # over the N loss tokens: chosen_p, rejected_p, chosen_{p+1}, ...
    rows: List[int]               # source row of each pair
    prefix_sharing: bool

    @property
    def num_pairs(self) -> int:
        return len(self.rows)

    def to(self, device) -> "PackedPairs":
        """On `device`, copied without a synchronisation (the layout was validated on the CPU)."""
        return PackedPairs(*(to_device(t, device) for t in (self.input_ids, self.position_ids, self.unit_ids,
                                                             self.roles, self.loss_positions, self.targets)),
                           self.layout.to(device), self.rows, self.prefix_sharing)


def pack_pairs(pairs: Sequence, *, prefix_sharing: bool) -> PackedPairs:
    """Pack tokenized pairs (objects with prompt_ids, chosen_ids, rejected_ids, row) for one forward."""
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    ids: List[int] = []
    positions: List[int] = []
    units: List[int] = []
    roles: List[int] = []
    loss_positions: List[int] = []
    targets: List[int] = []
    seq_lens: List[int] = []

    def append(tokens, role, unit, first_position):
        start = len(ids)
        ids.extend(tokens)
        positions.extend(range(first_position, first_position + len(tokens)))
        units.extend([unit] * len(tokens))
        roles.extend([role] * len(tokens))
        return start

    def read_response(prompt_last, response_start, response):
        """The response's tokens are predicted by the prompt's last token, then by themselves."""
        loss_positions.append(prompt_last)
        loss_positions.extend(range(response_start, response_start + len(response) - 1))
        targets.extend(response)
        seq_lens.append(len(response))

    for index, pair in enumerate(pairs):
        prompt, chosen, rejected = list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)
        if not prompt or not chosen or not rejected:
            raise ValueError(f"pair {index} (row {pair.row}) has an empty prompt or response")
        p = len(prompt)
        if prefix_sharing:
            start = append(prompt, PROMPT, index, 0)
            chosen_start = append(chosen, CHOSEN, index, p)
            rejected_start = append(rejected, REJECTED, index, p)
            read_response(start + p - 1, chosen_start, chosen)
            read_response(start + p - 1, rejected_start, rejected)
        else:
            for offset, response, role in ((0, chosen, CHOSEN), (1, rejected, REJECTED)):
                start = append(prompt, PROMPT, 2 * index + offset, 0)
                response_start = append(response, role, 2 * index + offset, p)
                read_response(start + p - 1, response_start, response)

    num_pairs = len(pairs)
    cu_seqlens = torch.zeros(2 * num_pairs + 1, dtype=torch.long)
    cu_seqlens[1:] = torch.tensor(seq_lens).cumsum(0)
    layout = PackedLayout.paired(
        cu_seqlens, torch.ones(len(targets), dtype=torch.bool),
        torch.arange(0, 2 * num_pairs, 2), torch.arange(1, 2 * num_pairs, 2))
    return PackedPairs(
        input_ids=torch.tensor(ids)[None], position_ids=torch.tensor(positions)[None],
        unit_ids=torch.tensor(units), roles=torch.tensor(roles),
        loss_positions=torch.tensor(loss_positions), targets=torch.tensor(targets),
        layout=layout, rows=[pair.row for pair in pairs], prefix_sharing=prefix_sharing)


def may_attend(unit_q, role_q, pos_q, unit_k, role_k, pos_k):
    """The attention rule: same unit, causal in stream order, rejected never sees chosen.

    Arguments are broadcastable index tensors (pos = stream index, not position id).
    """
    return (unit_q == unit_k) & (pos_k <= pos_q) & ~((role_q == REJECTED) & (role_k == CHOSEN))


def dense_attention_mask(packed: PackedPairs, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, T] additive mask (0 where allowed, the dtype's minimum elsewhere) for sdpa/eager."""
    stream = torch.arange(packed.unit_ids.numel(), device=packed.unit_ids.device)
    allowed = may_attend(packed.unit_ids[:, None], packed.roles[:, None], stream[:, None],
                         packed.unit_ids[None, :], packed.roles[None, :], stream[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def flex_block_mask(packed: PackedPairs):
    """The same rule as a FlexAttention BlockMask: no T x T tensor, fully masked blocks skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    units, roles = packed.unit_ids, packed.roles

    def mask_mod(batch, head, q, k):
        return may_attend(units[q], roles[q], q, units[k], roles[k], k)

    length = units.numel()
    return create_block_mask(mask_mod, None, None, length, length, device=units.device)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> PackedPairs:
    """Pack the right-padded [2B, T] preference batch of TRL's collator (the B chosen rows, then the
    B rejected rows of the same pairs) plainly: each row's tokens a segment of their own, positions
    restarting at 0, attention block-diagonal causal (see :func:`may_attend`).

    Token t of a row predicts token t + 1 where completion_mask[t + 1] is 1: TRL's shifted
    completion mask, so the packed batch scores exactly the tokens the padded one does. The layout
    lists the rows in order (chosen_index 0..B-1, rejected_index B..2B-1). Host work: build it on
    the CPU (a data collator) and move it with :meth:`PackedPairs.to`.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask and completion_mask must be [2B, T] alike, got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)} and {tuple(completion_mask.shape)}")
    rows, width = input_ids.shape
    if rows == 0 or rows % 2:
        raise ValueError(f"the paired padded layout needs 2B rows (B chosen, then B rejected), got {rows}")
    lengths = attention_mask.sum(dim=1)
    real = torch.arange(width) < lengths[:, None]
    if not torch.equal(attention_mask.bool(), real):
        raise ValueError("attention_mask must be right padding: each row's tokens first, then only padding")
    # (row, t) predicts (row, t + 1) when that token is a real completion token
    predicts = torch.zeros_like(real)
    predicts[:, :-1] = completion_mask[:, 1:].bool() & real[:, 1:]
    offsets = torch.zeros(rows, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)[:-1]
    row_of, column = predicts.nonzero(as_tuple=True)
    half = rows // 2
    row_ids = torch.arange(rows)[:, None].expand(rows, width)
    response_role = torch.where(row_ids < half, CHOSEN, REJECTED)
    roles = torch.where(completion_mask.bool(), response_role, PROMPT)
    cu_seqlens = torch.zeros(rows + 1, dtype=torch.long)
    cu_seqlens[1:] = predicts.sum(dim=1).cumsum(0)
    layout = PackedLayout.paired(cu_seqlens, torch.ones(row_of.numel(), dtype=torch.bool),
                                 torch.arange(half), torch.arange(half, rows))
    return PackedPairs(
        input_ids=input_ids[real][None], position_ids=torch.arange(width).expand(rows, width)[real][None],
        unit_ids=row_ids[real], roles=roles[real], loss_positions=offsets[row_of] + column,
        targets=input_ids[row_of, column + 1], layout=layout, rows=list(range(half)), prefix_sharing=False)
