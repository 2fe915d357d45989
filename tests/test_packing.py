"""Packed and prefix-shared forwards give the log-probs of the plain padded forward."""

import pytest
import torch

import transformers
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

import fastpref  # noqa: E402
from fastpref.train.model import causal_lm_parts, packed_hidden
from fastpref.train.data import TokenizedPair as Pair
from fastpref.train.packing import pack_pairs




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


def packed_sequence_logps(model, packed, attention):
    """[S] each packed sequence's response log-prob, through the packed forward and the op."""
    hidden = packed_hidden(model, packed, attention)
    token_logp = fastpref.linear_logprobs(hidden, causal_lm_parts(model).head_weight, packed.targets)
    return fastpref.sequence_logps(token_logp, packed.layout)


# flex_attention is the CUDA path (a BlockMask, no [T, T] tensor); its forward runs on the CPU too.
@pytest.mark.parametrize("attention", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix-shared"])
def test_packed_logps_equal_padded(attention, prefix_sharing):
    model = tiny_model(attention)
    pairs = random_pairs(4, 61, seed=1)
    packed = pack_pairs(pairs, prefix_sharing=prefix_sharing)
    with torch.no_grad():
        assert torch.allclose(packed_sequence_logps(model, packed, attention).double(), padded_logps(model, pairs),
                              rtol=1e-5, atol=1e-4)


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


# -- a prompt's K responses in one unit ---------------------------------------------------------------

def random_groups(count, responses, vocab, seed):
    """Prompt groups: `responses` distinct responses each, every one in at least one pair, some in several."""
    from fastpref.train.data import TokenizedGroup

    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    size = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    groups = []
    for g in range(count):
        order = torch.randperm(responses, generator=gen).tolist()
        # a chain through every response, then a pair between the ends: each response in one to three pairs
        links = list(zip(order, order[1:])) + [(order[0], order[-1])]
        groups.append(TokenizedGroup(draw(size(1, 6)), tuple(draw(size(1, 7)) for _ in range(responses)),
                                     tuple(links), row=100 + g, rows=tuple(range(100 + g, 100 + g + len(links)))))
    return groups


def as_pairs(groups):
    """The groups' pairs, each a pair of its own: the unshared data."""
    return [Pair(g.prompt_ids, g.responses[c], g.responses[r], row=1000 * g.row + k)
            for g in groups for k, (c, r) in enumerate(g.pairs)]


def padded_group_logps(model, groups):
    return padded_logps(model, [Pair(g.prompt_ids, g.responses[k], g.responses[k + 1] if k + 1 < len(g.responses)
                                     else g.responses[0], row=0)
                                for g in groups for k in range(0, len(g.responses), 2)])


@pytest.mark.parametrize("attention", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix-shared"])
def test_group_logps_equal_padded(attention, prefix_sharing):
    """K = 4 responses of a prompt in one unit: each response's log-prob is that of its own unshared
    padded sequence (it attends to the prompt and to itself only)."""
    model = tiny_model(attention)
    groups = random_groups(3, 4, 61, seed=5)
    packed = pack_pairs(groups, prefix_sharing=prefix_sharing)
    assert packed.layout.num_sequences == 12 and packed.layout.num_pairs == 12
    assert packed.layout.shares_sequences
    with torch.no_grad():
        assert torch.allclose(packed_sequence_logps(model, packed, attention).double(),
                              padded_group_logps(model, groups), rtol=1e-5, atol=1e-4)
    if prefix_sharing:
        # the prompt once per group: K - 1 prompts fewer than the plain packing
        plain = pack_pairs(groups, prefix_sharing=False)
        assert plain.input_ids.shape[1] - packed.input_ids.shape[1] == 3 * sum(len(g.prompt_ids) for g in groups)


@pytest.mark.parametrize("gradients_in_forward", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_group_loss_and_gradients_equal_the_unshared_pairs(gradients_in_forward, loss_type):
    """The loss of the groups, each response computed once, equals the loss of the same pairs packed
    one by one (a response repeated in every pair it is in), and so do the parameter gradients, in
    float64 (but for the float32 that Llama's RMSNorm computes in); small row groups split the batch
    between gradient groups (each a whole prompt group)."""
    model = tiny_model("sdpa").double()
    groups = random_groups(3, 5, 61, seed=7)
    pairs = as_pairs(groups)
    loss_fn = fastpref.PreferenceLoss(loss_type, beta=0.5, gradients_in_forward=gradients_in_forward, group_rows=8)
    reference_of_response = {tuple(g.prompt_ids + [-1] + r): -float(i + 1) for g in groups
                             for i, r in enumerate(g.responses)}
    group_reference = torch.tensor([reference_of_response[tuple(g.prompt_ids + [-1] + r)]
                                    for g in groups for r in g.responses], dtype=torch.float64)
    pair_reference = torch.tensor([reference_of_response[tuple(p.prompt_ids + [-1] + r)]
                                   for p in pairs for r in p.responses], dtype=torch.float64)
    results = []
    for items, reference, prefix_sharing in ((groups, group_reference, True), (groups, group_reference, False),
                                             (pairs, pair_reference, False)):
        model.zero_grad()
        packed = pack_pairs(items, prefix_sharing=prefix_sharing)
        parts = causal_lm_parts(model)
        loss, metrics = loss_fn(packed_hidden(model, packed, "sdpa"), parts.head_weight, packed.targets,
                                packed.layout, reference)
        loss.backward()
        results.append((loss.detach(), metrics["rewards/margins"].detach(),
                        torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    expected_loss, expected_margin, expected_grad = results[-1]
    for loss, margin, grad in results[:-1]:
        assert torch.allclose(loss, expected_loss, rtol=1e-7, atol=1e-9)
        assert torch.allclose(margin, expected_margin, rtol=1e-7, atol=1e-9)
        assert (grad - expected_grad).norm() / expected_grad.norm() < 1e-6


def test_loss_units_join_the_responses_linked_by_pairs():
    from fastpref.head_loss import loss_units, row_groups

    groups = random_groups(3, 4, 61, seed=9)
    layout = pack_pairs(groups, prefix_sharing=True).layout
    assert loss_units(layout) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    kept = torch.ones(layout.num_tokens, dtype=torch.bool)
    # a row group never splits a prompt group, however small the row budget
    for rows in row_groups(layout, kept, rows_per_group=1):
        assert layout.sequence_ids[rows].unique().numel() == 4


def test_group_by_prompt_merges_pairs_of_a_prompt_and_their_repeated_responses():
    from fastpref.train.data import group_by_prompt

    pairs = [Pair([1, 2], [3], [4], row=0), Pair([5], [6], [7], row=1), Pair([1, 2], [3], [8, 9], row=2),
             Pair([1, 2], [8, 9], [4], row=3)]
    first, second = group_by_prompt(pairs)
    assert first.prompt_ids == [1, 2] and first.responses == ([3], [4], [8, 9])
    assert first.pairs == ((0, 1), (0, 2), (2, 1)) and first.row == 0 and first.rows == (0, 2, 3)
    assert second.responses == ([6], [7]) and second.pairs == ((0, 1),) and second.rows == (1,)
    with pytest.raises(ValueError, match="row 4: chosen and rejected are the same tokens"):
        group_by_prompt([Pair([1], [2], [2], row=4)])


def test_ld_alpha_refuses_a_response_in_several_pairs():
    groups = random_groups(1, 3, 61, seed=11)
    packed = pack_pairs(groups, prefix_sharing=True)
    hidden = torch.randn(packed.targets.numel(), 8)
    weight = torch.randn(61, 8)
    with pytest.raises(ValueError, match="ld_alpha weighs each response by its pair's shared length"):
        fastpref.PreferenceLoss("sigmoid", ld_alpha=0.5)(hidden, weight, packed.targets, packed.layout,
                                                         -torch.rand(3))
