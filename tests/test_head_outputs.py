"""The logit transforms and the per-token outputs of fastpref.linear_logprobs against float64.

z = s(W h + b) with s the logit transform (scale, soft cap, temperature, in TRL's order); the op
returns log p_t, the entropy, log sum p^2, the mean logit and whether t is the argmax, in the same
pass, and differentiates log p_t and the entropy. Odd shapes spanning several blocks of every
backend; logits large enough that the soft cap bends them; the loss mixes both differentiable
outputs with fresh random weights, so every gradient term is checked.
"""
import pytest
import torch

import fastpref
from fastpref.backends import torch_backend
from reference import reference_head_outputs, relative_error
from test_linear_logprobs import DEVICE, TOLERANCE, make_inputs
from tiers import first_fast

BACKENDS = ["torch", "triton"]
ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TRANSFORMS = {
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=2.5),  # logits of std ~3 x 1.7: most are bent
    "temperature": dict(temperature=0.6),
    "all": dict(logit_scale=1.7, softcap=3.0, temperature=1.3),
}


@pytest.fixture(autouse=True)
def _small_torch_blocks(monkeypatch):
    monkeypatch.setattr(torch_backend, "MAX_ROW_BLOCK", 8)
    monkeypatch.setattr(torch_backend, "BLOCK_ELEMENTS", 8 * 64)


def run_and_compare_outputs(backend, hidden, weight, bias, targets, grad_out, *, transform, outputs=ALL_OUTPUTS,
                            trainable_head=True, entropy_weight=0.7, tolerance=None, seed=0):
    """Forward (every output asked for) and backward of sum(g log_probs) + sum(g_H entropy)
    through fastpref and the float64 reference; asserts each output's and gradient's bound."""
    tolerance = tolerance or TOLERANCE[hidden.dtype]
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(trainable_head)
    inputs = [hidden] + ([weight] if trainable_head else [])
    if bias is not None:
        bias = bias.detach().requires_grad_()
        inputs.append(bias)
    grad_entropy = torch.randn(targets.shape, generator=torch.Generator().manual_seed(seed)).to(hidden.device)

    got = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, outputs=outputs, backend=backend, **transform)
    objective = (got.log_probs * grad_out).sum()
    if "entropy" in outputs:
        objective = objective + entropy_weight * (got.entropy * grad_entropy).sum()
    grads = torch.autograd.grad(objective, inputs)

    ref_inputs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref_weight = ref_inputs[1] if trainable_head else weight.detach().double().cpu()
    ref_bias = ref_inputs[-1] if bias is not None else None
    ref = reference_head_outputs(ref_inputs[0], ref_weight, targets, ref_bias, **transform)
    ref_objective = (ref["log_probs"] * grad_out.double().cpu()).sum()
    if "entropy" in outputs:
        ref_objective = ref_objective + entropy_weight * (ref["entropy"] * grad_entropy.double().cpu()).sum()
    ref_grads = torch.autograd.grad(ref_objective, ref_inputs)

    kept = (targets != -100).cpu()
    for name in ALL_OUTPUTS:
        value = getattr(got, name)
        if name not in outputs and name != "log_probs":
            assert value is None, f"{name} was not asked for"
            continue
        assert value.shape == targets.shape
        if name == "is_top1":
            assert value.dtype == torch.bool
            decided = ref["top_gap"] > 1e-3  # where the two largest logits are not a near tie
            assert torch.equal(value.cpu()[decided], ref["is_top1"][decided]), "is_top1"
            assert not value.cpu()[~kept].any()
            continue
        assert value.dtype == torch.float32
        assert torch.all(value.detach().cpu()[~kept] == 0), f"{name} must be 0 at ignored positions"
        err = relative_error(value.detach(), ref[name])
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"
    names = ["hidden", "weight", "bias"] if trainable_head else ["hidden", "bias"]
    for name, grad, ref_grad, given in zip(names, grads, ref_grads, inputs):
        assert grad.dtype == given.dtype, f"d_{name} must come back in {given.dtype}"
        err = relative_error(grad, ref_grad)
        assert err <= tolerance, f"d_{name}: relative error {err:.2e} > {tolerance:.0e}"
    return got, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
@pytest.mark.parametrize("trainable_head", first_fast([True, False]), ids=["trainable", "frozen"])
def test_transforms_and_outputs_match_float64(backend, transform, dtype, trainable_head):
    inputs = make_inputs(37, 70, 301, dtype, with_bias=trainable_head, ignore_every=5)
    run_and_compare_outputs(backend, *inputs, transform=transform, trainable_head=trainable_head)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outputs", [("log_probs",), ("entropy",), ("log_sum_sq_probs", "is_top1"),
                                     ("mean_logits",)], ids=lambda o: "+".join(o))
@pytest.mark.parametrize("trainable_head", first_fast([True, False]), ids=["trainable", "frozen"])
def test_each_output_alone(backend, outputs, trainable_head):
    """Each output's sums switched on alone (the kernels' flags), with the soft cap on."""
    inputs = make_inputs(23, 40, 150, torch.float32, with_bias=True, ignore_every=4)
    run_and_compare_outputs(backend, *inputs, transform=TRANSFORMS["all"], outputs=outputs,
                            trainable_head=trainable_head)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_cap_bends_large_logits(backend):
    """Logits in the hundreds under a cap of 30 (Gemma-2's): z saturates near +-30 and the slope
    1 - tanh^2 goes small; the outputs and gradients still match."""
    inputs = make_inputs(21, 48, 200, torch.float32, with_bias=True, ignore_every=4, logit_scale=300.0)
    run_and_compare_outputs(backend, *inputs, transform=dict(softcap=30.0), tolerance=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_used_as_a_metric_only(backend):
    """entropy asked for, its gradient never used: the gradients are those of log_probs alone."""
    hidden, weight, bias, targets, grad_out = make_inputs(19, 33, 90, torch.float32, with_bias=True, ignore_every=3)
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    got = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], outputs=("entropy",), backend=backend)
    grads = torch.autograd.grad((got.log_probs * grad_out).sum(), leaves)
    plain = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], backend=backend)
    expected = torch.autograd.grad((plain * grad_out).sum(), leaves)
    for ours, theirs in zip(grads, expected):
        assert relative_error(ours, theirs) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_alone(backend):
    """A loss of the entropy only (an entropy bonus): log_probs' gradient is None in the backward."""
    hidden, weight, bias, targets, grad_out = make_inputs(17, 30, 80, torch.float32, with_bias=True, ignore_every=4)
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    got = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], outputs=("entropy",), backend=backend,
                                   softcap=2.0)
    grads = torch.autograd.grad((got.entropy * grad_out).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_head_outputs(*ref_leaves[:2], targets, ref_leaves[2], softcap=2.0)
    expected = torch.autograd.grad((ref["entropy"] * grad_out.double()).sum(), ref_leaves)
    for ours, theirs in zip(grads, expected):
        assert relative_error(ours, theirs) <= 1e-5


def test_gradcheck_float64_with_every_transform_and_the_entropy():
    hidden, weight, bias, targets, _ = make_inputs(6, 5, 19, torch.float64, with_bias=True, ignore_every=4)
    args = tuple(x.detach().requires_grad_() for x in (hidden, weight, bias))

    def objective(h, w, b):
        got = fastpref.linear_logprobs(h, w, targets, bias=b, outputs=("entropy",), backend="torch",
                                       **TRANSFORMS["all"])
        return got.log_probs + 0.5 * got.entropy

    assert torch.autograd.gradcheck(objective, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_takes_the_first_maximum(backend):
    """argmax's convention: a tie with an earlier token is not a top-1 prediction, with a later one it is."""
    hidden = torch.ones(3, 4, device=DEVICE)
    weight = torch.zeros(10, 4, device=DEVICE)
    weight[[2, 6]] = 1.0  # columns 2 and 6 tie for the maximum
    targets = torch.tensor([2, 6, 5], device=DEVICE)
    got = fastpref.linear_logprobs(hidden, weight, targets, outputs=("is_top1",), backend=backend)
    assert got.is_top1.tolist() == [True, False, False]


def test_plain_call_returns_a_tensor_and_outputs_an_object():
    hidden, weight, bias, targets, _ = make_inputs(9, 12, 40, torch.float32, ignore_every=3)
    plain = fastpref.linear_logprobs(hidden, weight, targets)
    assert isinstance(plain, torch.Tensor)
    got = fastpref.linear_logprobs(hidden, weight, targets, outputs=("log_probs",))
    assert isinstance(got, fastpref.LinearLogprobsOutput) and got.entropy is None and got.is_top1 is None
    assert torch.equal(got.log_probs, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_transform_changes_nothing(backend):
    hidden, weight, bias, targets, _ = make_inputs(13, 20, 70, torch.float32, with_bias=True, ignore_every=3)
    plain = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    explicit = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend, logit_scale=1,
                                        softcap=None, temperature=1.0)
    assert torch.equal(plain, explicit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_masked_vocabulary_columns_give_finite_outputs(backend, trainable_head):
    """A bias of -inf on some columns (a vocabulary masked out): p = 0 there, and every output and
    gradient, the entropy's included, stays finite and matches float64 (0 log 0 = 0)."""
    hidden, weight, bias, targets, grad_out = make_inputs(19, 24, 130, torch.float32, with_bias=True, seed=7)
    bias[:40] = float("-inf")
    bias[70:75] = float("-inf")
    targets = 75 + targets % 55  # targets among the columns left
    targets[::5] = -100
    leaves = [x.detach().requires_grad_(r) for x, r in ((hidden, True), (weight, trainable_head), (bias, False))]
    # no soft cap here: it would bend -inf to -softcap, and nothing would be masked
    got = fastpref.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], outputs=ALL_OUTPUTS, backend=backend,
                                   temperature=0.8)
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad((got.log_probs * grad_out).sum() + got.entropy.sum(), wanted)
    ref_leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
    ref = reference_head_outputs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], temperature=0.8)
    expected = torch.autograd.grad((ref["log_probs"] * grad_out.double()).sum() + ref["entropy"].sum(),
                                   [x for x in ref_leaves if x.requires_grad])
    for name in ("log_probs", "entropy", "log_sum_sq_probs"):
        assert relative_error(getattr(got, name), ref[name]) <= 1e-5, name
    assert torch.isneginf(got.mean_logits[targets != -100]).all()  # the mean of logits with some -inf
    for ours, theirs in zip(grads, expected):
        assert relative_error(ours, theirs) <= 1e-5
