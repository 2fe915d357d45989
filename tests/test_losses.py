"""Preference losses against float64 references written pair by pair, on packed batches."""
import pytest
import torch

import fastpref
from reference import (reference_kto_loss, reference_pair_loss, reference_sequence_logps,
                       relative_error)
from tiers import first_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# the types tests/reference.py writes out pair by pair; every type is checked against TRL in test_trl_integration
REFERENCE_WRITTEN = ("sigmoid", "ipo", "simpo", "hinge", "robust", "orpo", "apo_zero", "apo_down", "sft")


def make_packed_batch(num_pairs, width, vocab, dtype, *, seed=None, unpaired=False):
    """Sequences of a random prompt (masked out) and response length, pairs in shuffled order."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    num_seqs = 2 * num_pairs
    prompt_lens = torch.randint(1, 5, (num_seqs,), generator=gen)
    response_lens = torch.randint(1, 8, (num_seqs,), generator=gen)
    seq_lens = prompt_lens + response_lens
    cu_seqlens = torch.zeros(num_seqs + 1, dtype=torch.long)
    cu_seqlens[1:] = seq_lens.cumsum(0)
    response_mask = torch.cat([torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
                               for p, r in zip(prompt_lens.tolist(), response_lens.tolist())])
    num_tokens = int(cu_seqlens[-1])
    hidden = torch.randn(num_tokens, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) * (2.0 / width**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets[~response_mask] = -100
    # a reference a little off the policy, as after some training
    reference = -response_lens.double() * torch.log(torch.tensor(float(vocab))) + torch.randn(num_seqs, generator=gen)
    if unpaired:
        desirable = torch.rand(num_seqs, generator=gen) < 0.5
        desirable[0], desirable[1] = True, False
        layout = fastpref.PackedLayout.unpaired(cu_seqlens, response_mask, desirable)
    else:
        order = torch.randperm(num_seqs, generator=gen)
        layout = fastpref.PackedLayout.paired(cu_seqlens, response_mask, order[:num_pairs], order[num_pairs:])
    to = lambda x: x.to(DEVICE)  # noqa: E731
    if DEVICE != "cpu":
        layout = type(layout)(**{k: (v.to(DEVICE) if v is not None else None) for k, v in [
            ("cu_seqlens", layout.cu_seqlens), ("response_mask", layout.response_mask),
            ("chosen_index", layout.chosen_index), ("rejected_index", layout.rejected_index),
            ("desirable", layout.desirable)]})
    return to(hidden), to(weight), to(targets), layout, to(reference.float())


def reference_grads(loss_fn, hidden, weight, targets, layout):
    """Loss, d_hidden, d_weight through the float64 materialized pipeline."""
    h = hidden.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    seq, lengths = reference_sequence_logps(h, w, targets, layout.cu_seqlens.cpu(),
                                            layout.response_mask.cpu())
    loss = loss_fn(seq, lengths)
    d_h, d_w = torch.autograd.grad(loss, [h, w])
    return loss.detach(), d_h, d_w, seq.detach(), lengths


def check(loss_module, hidden, weight, targets, layout, reference, ref_loss_fn, tolerance, **call):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss, metrics = loss_module(h, w, targets, layout, reference, **call)
    d_h, d_w = torch.autograd.grad(loss, [h, w])
    ref_loss, ref_d_h, ref_d_w, seq, lengths = reference_grads(ref_loss_fn, hidden, weight, targets, layout)
    # a loss near 0 is a cancellation of O(1) terms (robust's two, a mean of pairs of either sign):
    # its rounding error is relative to the terms, not to the loss, so the scale is at least 1
    assert abs(float(loss) - float(ref_loss)) <= tolerance * max(abs(float(ref_loss)), 1.0)
    assert relative_error(d_h, ref_d_h) <= tolerance, "d_hidden"
    assert relative_error(d_w, ref_d_w) <= tolerance, "d_weight"
    return loss, metrics, seq, lengths


def options_for(loss_type):
    return {"label_smoothing": 0.1} if loss_type in ("robust", "simpo") else {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("loss_type", REFERENCE_WRITTEN)
def test_each_paired_loss_matches_its_reference(backend, dtype, loss_type):
    check_paired_loss(backend, dtype, loss_type)


def check_paired_loss(backend, dtype, loss_type):
    """One loss type on a fresh packed batch: loss and gradients against the pair-by-pair reference."""
    hidden, weight, targets, layout, reference = make_packed_batch(5, 24, 97, dtype)
    options = options_for(loss_type)
    module = fastpref.PreferenceLoss(loss_type, beta=0.3, backend=backend, **options)
    needs_ref = module.spec.needs_reference
    ref_cpu = reference.double().cpu()

    def ref_loss(seq, lengths):
        return reference_pair_loss(loss_type, seq, lengths, layout.chosen_index.tolist(),
                                   layout.rejected_index.tolist(), ref_cpu if needs_ref else None,
                                   beta=0.3, eps=options.get("label_smoothing", 0.0))

    check(module, hidden, weight, targets, layout, reference if needs_ref else None, ref_loss,
          TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "hinge"])
@pytest.mark.parametrize("average_logps", first_fast([True, False]))
def test_reduction_override(backend, loss_type, average_logps):
    """IPO on sequence log-probs (the paper) or on means (TRL); DPO on means, SimPO on sums."""
    hidden, weight, targets, layout, reference = make_packed_batch(4, 20, 61, torch.float32)
    module = fastpref.PreferenceLoss(loss_type, beta=0.2, average_logps=average_logps, backend=backend)
    needs_ref = module.spec.needs_reference

    def ref_loss(seq, lengths):
        return reference_pair_loss(loss_type, seq, lengths, layout.chosen_index.tolist(),
                                   layout.rejected_index.tolist(),
                                   reference.double().cpu() if needs_ref else None,
                                   beta=0.2, average=average_logps)

    check(module, hidden, weight, targets, layout, reference if needs_ref else None, ref_loss,
          TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sum_rpo(backend):
    hidden, weight, targets, layout, reference = make_packed_batch(6, 16, 53, torch.float32)
    module = fastpref.PreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.25, backend=backend)
    chosen, rejected = layout.chosen_index.tolist(), layout.rejected_index.tolist()

    def ref_loss(seq, lengths):
        ref = reference.double().cpu()
        return (reference_pair_loss("sigmoid", seq, lengths, chosen, rejected, ref, beta=0.25)
                + 0.7 * reference_pair_loss("sft", seq, lengths, chosen, rejected, None, beta=0.25))

    _, metrics, seq, lengths = check(module, hidden, weight, targets, layout, reference, ref_loss, 1e-5)
    expected_nll = -sum(seq[c] for c in chosen) / sum(lengths[c] for c in chosen)
    assert relative_error(metrics["nll_loss"], expected_nll) <= 1e-5
    assert set(metrics) >= {"loss/sigmoid", "loss/sft", "nll_loss"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average_logps", [False, True])
def test_kto_matches_its_reference(backend, average_logps):
    hidden, weight, targets, layout, reference = make_packed_batch(4, 20, 71, torch.float32, unpaired=True)
    module = fastpref.PreferenceLoss("kto", beta=0.15, desirable_weight=1.3, undesirable_weight=0.8,
                                     average_logps=average_logps, backend=backend)
    kl = 0.4

    def ref_loss(seq, lengths):
        return reference_kto_loss(seq, lengths, layout.desirable.tolist(), reference.double().cpu(),
                                  beta=0.15, kl=kl, desirable_weight=1.3, undesirable_weight=0.8,
                                  average=average_logps)

    _, metrics, _, _ = check(module, hidden, weight, targets, layout, reference, ref_loss, 1e-5, kto_kl=kl)
    assert float(metrics["kl"]) == pytest.approx(kl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_follow_trl(backend):
    hidden, weight, targets, layout, reference = make_packed_batch(7, 16, 45, torch.float32)
    beta = 0.5
    loss, metrics = fastpref.PreferenceLoss("sigmoid", beta=beta, backend=backend)(
        hidden, weight, targets, layout, reference)
    seq, _ = reference_sequence_logps(hidden, weight, targets, layout.cu_seqlens.cpu(), layout.response_mask.cpu())
    c, r = layout.chosen_index.cpu(), layout.rejected_index.cpu()
    ref = reference.double().cpu()
    reward_c, reward_r = beta * (seq[c] - ref[c]), beta * (seq[r] - ref[r])
    expected = {
        "rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
        "rewards/accuracies": (reward_c > reward_r).double().mean(),
        "rewards/margins": (reward_c - reward_r).mean(),
        "logps/chosen": seq[c].mean(), "logps/rejected": seq[r].mean(),
        "loss/sigmoid": loss.detach().double().cpu(),
        "non_finite_logps": torch.zeros((), dtype=torch.float64),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert not metrics[key].requires_grad
        assert float(metrics[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_head_equals_precomputed_reference(backend):
    hidden, weight, targets, layout, _ = make_packed_batch(5, 24, 80, torch.float32)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    module = fastpref.PreferenceLoss("sigmoid", beta=0.1, backend=backend)
    with torch.no_grad():
        token_logp = fastpref.linear_logprobs(ref_hidden, weight, targets.masked_fill(~layout.response_mask, -100),
                                              backend=backend)
    precomputed = fastpref.sequence_logps(token_logp, layout)
    loss_a, _ = module(hidden, weight, targets, layout, precomputed)
    loss_b, _ = module(hidden, weight, targets, layout, fastpref.ReferenceHead(ref_hidden, weight))
    assert relative_error(loss_a, loss_b) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_packed_layouts_agree(backend):
    """A TRL-style padded batch (prompt, response, right padding) and its hand-packed twin."""
    gen = torch.Generator().manual_seed(7)
    num_pairs, length, width, vocab = 3, 11, 16, 40
    rows = 2 * num_pairs
    padded_hidden = torch.randn(rows, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    padded_targets = torch.full((rows, length), -100)
    pieces, masks, targets, seq_lens = [], [], [], []
    for row in range(rows):
        prompt, response = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        tokens = torch.randint(0, vocab, (response,), generator=gen)
        padded_targets[row, prompt:prompt + response] = tokens
        pieces.append(padded_hidden[row, :prompt + response])
        masks.append(torch.arange(prompt + response) >= prompt)
        targets.append(torch.cat([torch.full((prompt,), -100), tokens]))
        seq_lens.append(prompt + response)
    reference = -torch.rand(rows, generator=gen) * 20
    module = fastpref.PreferenceLoss("sigmoid", beta=0.2, backend=backend)

    padded_hidden_leaf = padded_hidden.clone().requires_grad_()
    packed = fastpref.pack_padded(padded_hidden_leaf, padded_targets)
    loss_padded, metrics_padded = module(packed.hidden, weight, packed.targets, packed.layout, reference)
    (grad_padded,) = torch.autograd.grad(loss_padded, [padded_hidden_leaf])

    leaf = padded_hidden.clone().requires_grad_()
    stream = torch.cat([leaf[row, :n] for row, n in enumerate(seq_lens)])
    cu_seqlens = torch.tensor([0] + seq_lens).cumsum(0)
    layout = fastpref.PackedLayout.paired(cu_seqlens, torch.cat(masks), torch.arange(num_pairs),
                                          torch.arange(num_pairs, rows))
    loss_packed, metrics_packed = module(stream, weight, torch.cat(targets), layout, reference)
    (grad_packed,) = torch.autograd.grad(loss_packed, [leaf])

    assert relative_error(loss_packed, loss_padded) <= 1e-6
    assert relative_error(grad_packed, grad_padded) <= 1e-6
    for key in metrics_padded:
        assert float(metrics_packed[key]) == pytest.approx(float(metrics_padded[key]), rel=1e-6, abs=1e-7)


def test_backends_agree_on_every_part():
    hidden, weight, targets, layout, reference = make_packed_batch(6, 16, 50, torch.float32, seed=3)
    types = ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sft"]
    results = [fastpref.PreferenceLoss(types, beta=0.2, label_smoothing=0.05, backend=b)(
        hidden, weight, targets, layout, reference) for b in BACKENDS]
    (loss_a, metrics_a), (loss_b, metrics_b) = results
    assert relative_error(loss_a, loss_b) <= 1e-5
    assert set(metrics_a) == set(metrics_b)
    for key in metrics_a:
        assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unpaired", [False, True], ids=["paired", "unpaired"])
def test_token_metrics_match_full_logits(backend, unpaired):
    """token_metrics=True: TRL's entropy, logits/* and mean_token_accuracy from the op's outputs of the
    loss's own pass equal them computed from the float64 logits of a soft-capped, scaled head; the
    loss and its gradient are those without the metrics (up to rounding: the op's kernels differ
    once entropy, a differentiable output, is asked for)."""
    hidden, weight, targets, layout, reference = make_packed_batch(3, 24, 37, torch.float32, seed=4,
                                                                   unpaired=unpaired)
    # some targets the argmax, so that the accuracy is neither 0 nor 1
    transform = dict(logit_scale=0.7, softcap=2.5)
    logits = 2.5 * torch.tanh(0.7 * (hidden.double() @ weight.double().T).cpu() / 2.5)
    top1 = logits.argmax(-1).to(targets.device)
    kept = targets != -100
    targets = torch.where(kept & (torch.arange(targets.numel(), device=targets.device) % 3 == 0), top1, targets)
    loss_type = "kto" if unpaired else "sigmoid"
    results = []
    for token_metrics in (False, True):
        h = hidden.clone().requires_grad_()
        loss, metrics = fastpref.PreferenceLoss(loss_type, backend=backend, token_metrics=token_metrics,
                                                **transform)(h, weight, targets, layout, reference)
        loss.backward()
        results.append((loss.detach(), h.grad, metrics))
    (plain_loss, plain_grad, plain_metrics), (loss, grad, metrics) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert metrics.keys() - plain_metrics.keys() == (
        {"entropy", "logits/chosen", "logits/rejected"} | (set() if unpaired else {"mean_token_accuracy"}))

    kept = kept.cpu()
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    sequence = layout.sequence_ids.cpu()
    if unpaired:
        chosen = layout.desirable.cpu()[sequence] & kept
        rejected = ~layout.desirable.cpu()[sequence] & kept
    else:
        chosen = torch.isin(sequence, layout.chosen_index.cpu()) & kept
        rejected = torch.isin(sequence, layout.rejected_index.cpu()) & kept
    expected = {"entropy": entropy[kept].mean(), "logits/chosen": logits.mean(-1)[chosen].mean(),
                "logits/rejected": logits.mean(-1)[rejected].mean()}
    if not unpaired:
        accuracy = (top1.cpu() == targets.cpu())[chosen].double().mean()
        assert 0 < accuracy < 1
        expected["mean_token_accuracy"] = accuracy
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
