"""Packed and prefix-shared forwards give the log-probs of the plain padded forward."""
from dataclasses import dataclass
from typing import List

import pytest
import torch

import transformers
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

import fastpref  # noqa: E402
from fastpref.train.model import causal_lm_parts, packed_hidden
from fastpref.train.packing import pack_pairs


@dataclass(frozen=True)
class Pair:
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    row: int


def tiny_model(attention, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def random_pairs(count, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    size = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    return [Pair(draw(size(1, 6)), draw(size(1, 7)), draw(size(1, 7)), row=10 + i) for i in range(count)]


def padded_logps(model, pairs):
    """Each sequence on its own row of a right-padded batch, full logits, log_softmax, gather."""
    seqs = [(p.prompt_ids, r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    length = max(len(a) + len(b) for a, b in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (prompt, response) in enumerate(seqs):
        tokens = prompt + response
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits, -1)
    out = []
    for i, (prompt, response) in enumerate(seqs):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        out.append(logp[i, positions, torch.tensor(response)].sum())
    return torch.stack(out)


# flex_attention is the CUDA path (a BlockMask, no [T, T] tensor); its forward runs on the CPU too.
@pytest.mark.parametrize("attention", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix-shared"])
def test_packed_logps_equal_padded(attention, prefix_sharing):
    model = tiny_model(attention)
    pairs = random_pairs(4, 61, seed=1)
    packed = pack_pairs(pairs, prefix_sharing=prefix_sharing)
    parts = causal_lm_parts(model)
    with torch.no_grad():
        hidden = packed_hidden(model, packed, attention)
        token_logp = fastpref.linear_logprobs(hidden, parts.head_weight, packed.targets)
        packed_seq = fastpref.sequence_logps(token_logp, packed.layout)
        expected = padded_logps(model, pairs)
    assert torch.allclose(packed_seq.double(), expected, rtol=1e-5, atol=1e-4)


def test_prefix_sharing_is_shorter_and_reads_the_prompt_end_twice():
    pairs = random_pairs(3, 61, seed=2)
    plain = pack_pairs(pairs, prefix_sharing=False)
    shared = pack_pairs(pairs, prefix_sharing=True)
    prompt_tokens = sum(len(p.prompt_ids) for p in pairs)
    assert plain.input_ids.shape[1] - shared.input_ids.shape[1] == prompt_tokens
    assert torch.equal(plain.targets, shared.targets)
    first_rejected = shared.layout.cu_seqlens[1]
    assert shared.loss_positions[0] == shared.loss_positions[first_rejected]


def test_packed_gradients_equal_padded():
    """The DPO loss's parameter gradients through the packed forward match the padded forward's."""
    model = tiny_model("sdpa")
    pairs = random_pairs(3, 61, seed=3)
    reference = -torch.rand(6) * 10
    loss_fn = fastpref.PreferenceLoss("sigmoid", beta=0.5)
    grads = []
    for prefix_sharing in (False, True):
        model.zero_grad()
        packed = pack_pairs(pairs, prefix_sharing=prefix_sharing)
        parts = causal_lm_parts(model)
        loss, _ = loss_fn(packed_hidden(model, packed, "sdpa"), parts.head_weight, packed.targets,
                          packed.layout, reference)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    seq = padded_logps(model, pairs).float()
    d = 0.5 * ((seq[0::2] - reference[0::2]) - (seq[1::2] - reference[1::2]))
    (-torch.nn.functional.logsigmoid(d).mean()).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for got in grads:
        assert (got - expected).norm() / expected.norm() < 1e-4


def test_pack_rows_scores_the_tokens_of_trls_shifted_completion_mask():
    """pack_rows of a right-padded [2B, T] batch: rows back to back without padding, positions
    restarting per row, and exactly the (hidden state, target) pairs that the padded batch's shifted
    completion mask scores, in the same order (pack_padded of the padded batch), a completion
    starting at position 0 (its first token has no predictor) included."""
    from fastpref.layout import pack_padded
    from fastpref.train.packing import CHOSEN, PROMPT, REJECTED, pack_rows

    generator = torch.Generator().manual_seed(3)
    lengths, prompts = [7, 4, 5, 6], [3, 0, 2, 4]  # row 1: no prompt (truncated away)
    width = max(lengths) + 1
    input_ids = torch.randint(3, 50, (4, width), generator=generator)
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    completion_mask = attention_mask * (torch.arange(width) >= torch.tensor(prompts)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    packed = pack_rows(input_ids, attention_mask, completion_mask)

    assert torch.equal(packed.input_ids[0], input_ids[attention_mask.bool()])
    assert torch.equal(packed.position_ids[0], torch.cat([torch.arange(n) for n in lengths]))
    assert packed.roles[:prompts[0]].eq(PROMPT).all() and packed.roles[prompts[0]:lengths[0]].eq(CHOSEN).all()
    assert packed.roles[sum(lengths[:2]) + prompts[2]:sum(lengths[:3])].eq(REJECTED).all()
    # stream position -> (row, column) of the padded batch: the same scored pairs in the same order
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    columns = packed.position_ids[0]
    shifted = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    padded = pack_padded(torch.arange(4 * (width - 1)).view(4, width - 1, 1).float(), shifted)
    assert torch.equal(rows[packed.loss_positions] * (width - 1) + columns[packed.loss_positions],
                       padded.positions)
    assert torch.equal(packed.targets, padded.targets)
    assert torch.equal(packed.layout.cu_seqlens, padded.layout.cu_seqlens)
    assert torch.equal(packed.layout.chosen_index, torch.arange(2))
    assert torch.equal(packed.layout.rejected_index, torch.arange(2, 4))
