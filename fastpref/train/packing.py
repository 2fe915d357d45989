"""One padding-free forward for a batch of preference pairs.

Plain packing puts [prompt | chosen] and [prompt | rejected] of every pair back to back, each a
segment of its own: positions restart at 0 per segment and attention is block-diagonal causal.

Prefix sharing puts [prompt | chosen | rejected] as one unit: the prompt is computed once, the
rejected tokens attend to the prompt and to themselves but never to the chosen ones, and their
positions continue from the prompt's end, so every token sees exactly what it would see in its
own unshared sequence. A prompt group (K responses and pairs among them) is one unit
[prompt | r_0 | ... | r_{K-1}] alike: each response sees the prompt and itself, and is computed
once for all the pairs it is in.

Unpaired examples (KTO) are packed plainly, [prompt | completion] each a segment of its own.

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

# roles of the tokens of a unit: its prompt, and response k (a pair's chosen 0, its rejected 1) as 1 + k
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def response_role(k: int) -> int:
    return 1 + k


@dataclass
class PackedPairs:
    input_ids: torch.Tensor       # [1, T] the packed stream
    position_ids: torch.Tensor    # [1, T]
    unit_ids: torch.Tensor        # [T] which segment (plain) or unit (shared) a token belongs to
    roles: torch.Tensor           # [T] PROMPT, or response_role(k) for response k of its unit
    loss_positions: torch.Tensor  # [N] stream positions whose hidden state predicts a response token
    targets: torch.Tensor         # [N] the response token each of them predicts
    layout: PackedLayout          # over the N loss tokens: each item's responses in order, item after item
    rows: List[int]               # source row of each pair or group (the key of each unpaired example)
    prefix_sharing: bool

    @property
    def num_pairs(self) -> int:
        return len(self.rows)

    def to(self, device) -> "PackedPairs":
        """On `device`, copied without a synchronisation (the layout was validated on the CPU)."""
        return PackedPairs(*(to_device(t, device) for t in (self.input_ids, self.position_ids, self.unit_ids,
                                                             self.roles, self.loss_positions, self.targets)),
                           self.layout.to(device), self.rows, self.prefix_sharing)


class _Stream:
    """A packed stream under construction: tokens, position ids, units and roles, and the
    positions whose hidden states predict response tokens."""

    def __init__(self):
        self.ids: List[int] = []
        self.positions: List[int] = []
        self.units: List[int] = []
        self.roles: List[int] = []
        self.loss_positions: List[int] = []
        self.targets: List[int] = []
        self.seq_lens: List[int] = []

    def append(self, tokens, role, unit, first_position) -> int:
        start = len(self.ids)
        self.ids.extend(tokens)
        self.positions.extend(range(first_position, first_position + len(tokens)))
        self.units.extend([unit] * len(tokens))
        self.roles.extend([role] * len(tokens))
        return start

    def read_response(self, prompt_last, response_start, response) -> None:
        """The response's tokens are predicted by the prompt's last token, then by themselves."""
        self.loss_positions.append(prompt_last)
        self.loss_positions.extend(range(response_start, response_start + len(response) - 1))
        self.targets.extend(response)
        self.seq_lens.append(len(response))

    def append_sequence(self, prompt, response, role, unit) -> None:
        """[prompt | response] as a segment of its own."""
        start = self.append(prompt, PROMPT, unit, 0)
        self.read_response(start + len(prompt) - 1, self.append(response, role, unit, len(prompt)), response)

    def cu_seqlens(self) -> torch.Tensor:
        cu_seqlens = torch.zeros(len(self.seq_lens) + 1, dtype=torch.long)
        cu_seqlens[1:] = torch.tensor(self.seq_lens).cumsum(0)
        return cu_seqlens

    def packed(self, layout: PackedLayout, rows: List[int], prefix_sharing: bool) -> PackedPairs:
        return PackedPairs(
            input_ids=torch.tensor(self.ids)[None], position_ids=torch.tensor(self.positions)[None],
            unit_ids=torch.tensor(self.units), roles=torch.tensor(self.roles),
            loss_positions=torch.tensor(self.loss_positions), targets=torch.tensor(self.targets),
            layout=layout, rows=rows, prefix_sharing=prefix_sharing)


def pack_pairs(items: Sequence, *, prefix_sharing: bool) -> PackedPairs:
    """Pack tokenized pairs or prompt groups (objects with prompt_ids, responses, pairs, row) for one
    forward. Each response is one sequence of the layout, the responses of an item in order, the
    items one after the other; pairs index them (a pair's chosen and rejected: responses 0 and 1)."""
    if not items:
        raise ValueError("pack_pairs needs at least one pair")
    stream = _Stream()
    chosen_index, rejected_index = [], []
    for index, item in enumerate(items):
        prompt, responses = list(item.prompt_ids), [list(response) for response in item.responses]
        if not prompt or not all(responses):
            raise ValueError(f"pair {index} (row {item.row}) has an empty prompt or response")
        first_sequence = len(stream.seq_lens)
        for chosen, rejected in item.pairs:
            chosen_index.append(first_sequence + chosen)
            rejected_index.append(first_sequence + rejected)
        p = len(prompt)
        if prefix_sharing:
            start = stream.append(prompt, PROMPT, index, 0)
            starts = [stream.append(response, response_role(k), index, p) for k, response in enumerate(responses)]
            for response_start, response in zip(starts, responses):
                stream.read_response(start + p - 1, response_start, response)
        else:
            for k, response in enumerate(responses):
                stream.append_sequence(prompt, response, response_role(k), len(stream.seq_lens))

    layout = PackedLayout.paired(stream.cu_seqlens(), torch.ones(len(stream.targets), dtype=torch.bool),
                                 torch.tensor(chosen_index), torch.tensor(rejected_index))
    return stream.packed(layout, [item.row for item in items], prefix_sharing)


def pack_completions(examples: Sequence, *, kl: bool = False) -> PackedPairs:
    """Pack unpaired examples (objects with prompt_ids, completion_ids, kl_completion_ids, label,
    key) for one forward: [prompt | completion] each a segment of its own, in an unpaired layout
    with the examples' labels; with `kl`, [prompt | KL completion] instead (KTO's KL estimate).
    `rows` of the result holds the examples' keys."""
    if not examples:
        raise ValueError("pack_completions needs at least one example")
    stream = _Stream()
    for index, example in enumerate(examples):
        prompt = list(example.prompt_ids)
        completion = list(example.kl_completion_ids if kl else example.completion_ids)
        if not prompt or not completion:
            raise ValueError(f"example {index} (row {example.row}) has an empty prompt or "
                             + ("KL completion" if kl else "completion"))
        stream.append_sequence(prompt, completion, CHOSEN if example.label else REJECTED, index)
    layout = PackedLayout.unpaired(stream.cu_seqlens(), torch.ones(len(stream.targets), dtype=torch.bool),
                                   torch.tensor([bool(example.label) for example in examples]))
    return stream.packed(layout, [example.key for example in examples], prefix_sharing=False)


def may_attend(unit_q, role_q, pos_q, unit_k, role_k, pos_k):
    """The attention rule: same unit, causal in stream order, a token sees the prompt and its own
    response only (a rejected never sees the chosen before it, nor a group's response k any other).

    Arguments are broadcastable index tensors (pos = stream index, not position id).
    """
    return (unit_q == unit_k) & (pos_k <= pos_q) & ((role_k == PROMPT) | (role_k == role_q))


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
