"""The CPU's one-op preference loss (gradients computed in the forward, group of pairs by group):
against the two-op path and float64 references, groups of every size, a store too small for a
group, the error paths."""
import pytest
import torch

import fastpref
from fastpref import deferred_errors, head_loss
from fastpref.backends import HeadOptions, torch_backend
from fastpref.logit_transform import LogitTransform
from fastpref.loss_spec import LOSS_TYPES, LossSpec
from reference import reference_logprobs, relative_error
from test_losses import make_packed_batch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the one-op loss runs on CPU tensors")

# every type whose pairs' gradients are independent (AOT's sorting couples them: see
# test_coupled_losses_and_wpo_take_the_two_op_path)
LOSSES = [(name, {"label_smoothing": 0.1} if name == "exo_pair" else {})
          for name in LOSS_TYPES if not name.startswith("aot")] + [
    (("sigmoid", "sft"), dict(loss_weights=(1.0, 0.4))),
    ("robust", dict(label_smoothing=0.2)),
    ("ipo", dict(average_logps=False)),
    ("sigmoid", dict(f_divergence_type="js_divergence", ld_alpha=0.5)),
    ("hinge", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.4, average_logps=True)),
]


def _step(loss_fn, hidden, weight, bias, targets, layout, reference, scale=1.0):
    leaves = [hidden.detach().clone().requires_grad_(hidden.requires_grad),
              weight.detach().clone().requires_grad_(weight.requires_grad),
              None if bias is None else bias.detach().clone().requires_grad_()]
    loss, metrics = loss_fn(leaves[0], leaves[1], targets, layout, reference, bias=leaves[2])
    (scale * loss).backward()
    grads = [None if leaf is None else leaf.grad for leaf in leaves]
    return loss.detach(), metrics, grads


TRANSFORMS = {"softcap": dict(softcap=2.5, logit_scale=1.3, temperature=0.8),  # blocks kept as x
              "scale": dict(logit_scale=1.3, temperature=0.8)}  # blocks kept as exp(z - m)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("loss_type,options", LOSSES, ids=[f"{name}-{sorted(options)}" for name, options in LOSSES])
def test_one_op_loss_equals_the_two_op_path(monkeypatch, loss_type, options, transform):
    """Every loss type, groups of 9 rows (pairs of up to 14 tokens: some pairs alone in a group),
    bias, a logit transform with and without a soft cap, a loss scaled before backward: the same
    loss, metrics and gradients as the log-prob op followed by the loss, in float64."""
    monkeypatch.setattr(head_loss, "GROUP_ROWS", 9)
    unpaired = loss_type == "kto"
    hidden, weight, targets, layout, reference = make_packed_batch(7, 12, 53, torch.float64, seed=11,
                                                                    unpaired=unpaired)
    bias = torch.randn(53, dtype=torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    spec_options = dict(options, **TRANSFORMS[transform])
    reference = reference if fastpref.PreferenceLoss(loss_type, **options).spec.needs_reference else None
    results = [_step(fastpref.PreferenceLoss(loss_type, gradients_in_forward=one_op, **spec_options),
                     hidden, weight, bias, targets, layout, reference, scale=2.5) for one_op in (True, False)]
    (loss, metrics, grads), (expected_loss, expected_metrics, expected_grads) = results
    assert relative_error(loss, expected_loss) < 1e-12
    for key, value in expected_metrics.items():
        assert torch.allclose(metrics[key], value, rtol=1e-12, atol=1e-12), key
    for got, expected in zip(grads, expected_grads):
        assert relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gradients_match_float64_materialized_logits(dtype, tolerance):
    """DPO's gradients from the one-op loss against autograd through float64 [N, V] logits."""
    hidden, weight, targets, layout, reference = make_packed_batch(6, 20, 301, dtype, seed=4)
    loss_fn = fastpref.PreferenceLoss("sigmoid", beta=0.5, gradients_in_forward=True)
    loss, _, (d_hidden, d_weight, _) = _step(loss_fn, hidden.requires_grad_(), weight.requires_grad_(), None,
                                             targets, layout, reference)

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp = reference_logprobs(h64, w64, torch.where(layout.response_mask, targets, -100))
    sums = torch.zeros(layout.num_sequences, dtype=torch.float64).index_add(0, layout.sequence_ids, logp)
    margin = 0.5 * ((sums - reference.double())[layout.chosen_index] - (sums - reference.double())[layout.rejected_index])
    expected = -torch.nn.functional.logsigmoid(margin).mean()
    expected.backward()
    assert relative_error(loss, expected) < tolerance
    assert relative_error(d_hidden, h64.grad) < tolerance
    assert relative_error(d_weight, w64.grad) < tolerance


# Three groups of uneven sizes over 23 rows.
GROUPS = ([0, 5, 7], list(range(8, 23)), [1, 2, 3, 4, 6])


def grouped_pass_and_expected(forward_backward_by_groups, hidden, weight, bias, targets, g, options, store_bytes):
    """A backend's forward_backward_by_groups over GROUPS with the per-row gradient g (checking that
    it asks for each group's gradient once, in order), and the torch backend's float64 forward and
    backward with that g: ((logp, d_hidden, d_weight, d_bias), the same expected)."""
    groups = [torch.tensor(rows, device=hidden.device) for rows in GROUPS]
    seen = []

    def token_gradient(rows, logp):
        seen.append(rows)
        return g[rows]

    need_bias = bias is not None
    got = forward_backward_by_groups(hidden, weight, bias, targets, groups, token_gradient, options, True, True,
                                     need_bias, store_bytes=store_bytes)
    assert [rows.tolist() for rows in seen] == [rows.tolist() for rows in groups]
    hidden64, weight64 = hidden.double(), weight.double()
    bias64 = None if bias is None else bias.double()
    saved = torch_backend.forward(hidden64, weight64, bias64, targets, options, fold_hidden_gradient=False)
    expected = torch_backend.backward(hidden64, weight64, bias64, targets, saved, g.double(), None, options,
                                      True, True, need_bias)
    return got, (saved.logp, *expected)


@pytest.mark.parametrize("softcap", [3.0, None])
@pytest.mark.parametrize("store_rows_of_logits", [0, 1, 3])
def test_a_store_too_small_recomputes_the_rest(store_rows_of_logits, softcap):
    """forward_backward_by_groups with a store of a few blocks (or none: one block at least) equals
    the backend's forward and backward with the same per-row gradient."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(23, 10, dtype=torch.float64, generator=gen)
    weight = torch.randn(37, 10, dtype=torch.float64, generator=gen)
    bias = torch.randn(37, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 37, (23,), generator=gen)
    g = torch.randn(23, dtype=torch.float64, generator=gen)
    got, expected = grouped_pass_and_expected(torch_backend.forward_backward_by_groups, hidden, weight, bias,
                                              targets, g, HeadOptions(LogitTransform(1.2, softcap, 0.9)),
                                              store_bytes=store_rows_of_logits * 37 * 8)
    for value, want in zip(got, expected):
        assert relative_error(value, want) < 1e-13


def test_row_groups_keep_pairs_whole():
    _, _, targets, layout, _ = make_packed_batch(11, 4, 20, torch.float32, seed=8)
    kept = torch.where(layout.response_mask, targets, -100) != -100
    groups = head_loss.row_groups(layout, kept, rows_per_group=10)
    rows = torch.cat(groups)
    assert sorted(rows.tolist()) == kept.nonzero().squeeze(1).tolist()
    pair_of_sequence = {}
    for pair, (chosen, rejected) in enumerate(zip(layout.chosen_index.tolist(), layout.rejected_index.tolist())):
        pair_of_sequence[chosen] = pair_of_sequence[rejected] = pair
    pairs_of_group = [{pair_of_sequence[s] for s in layout.sequence_ids[group].tolist()} for group in groups]
    assert all(not (a & b) for i, a in enumerate(pairs_of_group) for b in pairs_of_group[i + 1:])
    assert len(groups) > 2 and all(len(group) <= 10 or len(pairs) == 1 for group, pairs in zip(groups, pairs_of_group))


def test_a_second_backward_is_refused():
    hidden, weight, targets, layout, reference = make_packed_batch(2, 8, 30, torch.float32, seed=1)
    loss, _ = fastpref.PreferenceLoss(gradients_in_forward=True)(
        hidden.requires_grad_(), weight.requires_grad_(), targets, layout, reference)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="gradients_in_forward=False"):
        loss.backward()


@pytest.mark.parametrize("case,match", [
    ("frozen head", "trainable head"),
    ("token metrics", "token_metrics"),
    ("no grad", "trainable head"),
])
def test_asking_for_it_where_it_cannot_run_says_why(case, match):
    hidden, weight, targets, layout, reference = make_packed_batch(2, 8, 30, torch.float32, seed=1)
    loss_fn = fastpref.PreferenceLoss(gradients_in_forward=True, token_metrics=case == "token metrics")
    weight.requires_grad_(case != "frozen head")
    with torch.set_grad_enabled(case != "no grad"), pytest.raises(ValueError, match=match):
        loss_fn(hidden.requires_grad_(), weight, targets, layout, reference)


def test_the_default_takes_it_for_a_trainable_head_only(monkeypatch):
    calls = []
    original = head_loss.head_preference_loss
    monkeypatch.setattr(head_loss, "head_preference_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    hidden, weight, targets, layout, reference = make_packed_batch(2, 8, 30, torch.float32, seed=1)
    fastpref.PreferenceLoss()(hidden.requires_grad_(), weight.requires_grad_(), targets, layout, reference)
    assert calls == [1]
    fastpref.PreferenceLoss()(hidden, weight.detach(), targets, layout, reference)
    assert calls == [1]


def test_bad_targets_are_flagged_like_the_ops():
    hidden, weight, targets, layout, reference = make_packed_batch(2, 8, 30, torch.float32, seed=1)
    bad = targets.clone()
    bad[layout.response_mask.nonzero()[0, 0]] = 30
    loss_fn = fastpref.PreferenceLoss(gradients_in_forward=True)
    loss, _ = loss_fn(hidden.requires_grad_(), weight.requires_grad_(), bad, layout, reference)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V = 30\)"):
        deferred_errors.raise_pending_errors()
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V = 30\)"):
        fastpref.PreferenceLoss(gradients_in_forward=True, check=True)(hidden, weight, bad, layout, reference)


def test_group_rows_sets_the_groups(monkeypatch):
    """group_rows reaches row_groups (the CPU's default otherwise); a bad value is refused."""
    sizes = []
    original = head_loss.row_groups
    monkeypatch.setattr(head_loss, "row_groups",
                        lambda layout, kept, rows_per_group: sizes.append(rows_per_group) or original(
                            layout, kept, rows_per_group))
    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 30, torch.float32, seed=1)
    for group_rows in (5, None):
        fastpref.PreferenceLoss(gradients_in_forward=True, group_rows=group_rows)(
            hidden.requires_grad_(), weight.requires_grad_(), targets, layout, reference)
    assert sizes == [5, head_loss.GROUP_ROWS]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="group_rows must be None or a positive int"):
            fastpref.PreferenceLoss(group_rows=bad)


def test_a_backend_without_the_grouped_pass_says_so(monkeypatch):
    """gradients_in_forward=True on a backend that has no grouped pass names it and the ones that
    have; the default then takes the two-op path."""
    from fastpref.backends import triton_backend
    monkeypatch.setattr(triton_backend.BACKEND, "unavailable_reason", lambda device: None)
    hidden, weight, targets, layout, reference = make_packed_batch(2, 8, 30, torch.float32, seed=1)
    with pytest.raises(ValueError, match="backend 'triton' has no such pass.*'torch' backend has"):
        fastpref.PreferenceLoss(gradients_in_forward=True, backend="triton")(
            hidden.requires_grad_(), weight.requires_grad_(), targets, layout, reference)
    assert head_loss.unavailable_reason("triton", hidden, weight, LossSpec.build(), False) is not None
    assert head_loss.grouped_backend("auto", hidden.device).name == "torch"


@pytest.mark.parametrize("options", [dict(loss_type="aot"), dict(loss_type="aot_unpaired"),
                                     dict(loss_type="sigmoid", use_weighting=True)])
def test_coupled_losses_and_wpo_take_the_two_op_path(options):
    """AOT sorts the pairs' log-ratios (a group's gradients need every group's log-probs) and WPO
    reads per-token outputs the grouped pass does not compute: both refuse it by name."""
    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 20, torch.float32)
    weight = weight.detach().requires_grad_()
    with pytest.raises(ValueError, match="gradients_in_forward=True cannot run here: (loss types .* couple the "
                                         "pairs|WPO's weights)"):
        fastpref.PreferenceLoss(**options, gradients_in_forward=True)(hidden, weight, targets, layout, reference)
    fastpref.PreferenceLoss(**options)(hidden, weight, targets, layout, reference)[0].backward()
