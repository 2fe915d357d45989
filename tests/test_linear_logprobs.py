"""fastpref.linear_logprobs against a float64 materialized reference, every backend.

Without a GPU the Triton backend runs under TRITON_INTERPRET=1, so the shapes stay small; they
are odd on purpose (no dimension a multiple of a block size) and still span several row, vocab
and hidden blocks of both backends.
"""
import pytest
import torch

import fastpref
from fastpref.backends import torch_backend, triton_backend
from reference import reference_logprobs, relative_error
from tiers import first_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _small_torch_blocks(monkeypatch):
    """Blocks of 8 rows x 64 columns, so the torch backend's streaming is exercised too."""
    monkeypatch.setattr(torch_backend, "MAX_ROW_BLOCK", 8)
    monkeypatch.setattr(torch_backend, "BLOCK_ELEMENTS", 8 * 64)


def make_inputs(n, h, v, dtype, *, with_bias=False, ignore_every=0, logit_scale=3.0, seed=None):
    """Fresh random inputs; weight scaled so logits have standard deviation ~logit_scale."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_scale / h**0.5)
    bias = torch.randn(v, generator=gen) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    grad_out = torch.randn(n, generator=gen)
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE), grad_out.to(DEVICE)


def run_and_compare(backend, hidden, weight, bias, targets, grad_out, *, trainable_head=True,
                    tolerance=None, ignore_index=-100):
    """Forward + backward through fastpref and through the reference; assert the error bounds."""
    tolerance = tolerance or TOLERANCE[hidden.dtype]
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(trainable_head)
    inputs = [hidden] + ([weight] if trainable_head else [])
    if bias is not None:
        bias = bias.detach().requires_grad_()
        inputs.append(bias)

    logp = fastpref.linear_logprobs(hidden, weight, targets, bias=bias,
                                    ignore_index=ignore_index, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    grads = torch.autograd.grad((logp * grad_out).sum(), inputs)

    ref_inputs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref_hidden = ref_inputs[0]
    ref_weight = ref_inputs[1] if trainable_head else weight.detach().double().cpu()
    ref_bias = ref_inputs[-1] if bias is not None else None
    ref = reference_logprobs(ref_hidden, ref_weight, targets, ref_bias, ignore_index)
    ref_grads = torch.autograd.grad((ref * grad_out.double().cpu()).sum(), ref_inputs)

    kept = (targets != ignore_index).cpu()
    assert torch.all(logp.detach().cpu()[~kept] == 0), "ignored positions must be exactly 0"
    assert relative_error(logp.detach(), ref) <= tolerance
    names = ["hidden", "weight", "bias"] if trainable_head else ["hidden", "bias"]
    for name, grad, ref_grad, given in zip(names, grads, ref_grads, inputs):
        assert grad.dtype == given.dtype, f"d_{name} must come back in {given.dtype}"
        err = relative_error(grad, ref_grad)
        assert err <= tolerance, f"d_{name}: relative error {err:.2e} > {tolerance:.0e}"
    return logp, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_matches_float64_reference(backend, dtype, trainable_head):
    inputs = make_inputs(37, 70, 301, dtype, with_bias=trainable_head, ignore_every=5)
    run_and_compare(backend, *inputs, trainable_head=trainable_head)


@pytest.mark.smoke
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 16, 1), (3, 5, 2), (19, 33, 64), (40, 129, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(backend, shape):
    run_and_compare(backend, *make_inputs(*shape, torch.float32, with_bias=True, ignore_every=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_ignored_rows(backend):
    run_and_compare(backend, *make_inputs(23, 40, 150, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_all_rows_ignored(backend, trainable_head):
    hidden, weight, bias, targets, grad_out = make_inputs(11, 24, 50, torch.float32, with_bias=True)
    targets = torch.full_like(targets, -100)
    hidden.requires_grad_()
    weight.requires_grad_(trainable_head)
    bias.requires_grad_()
    logp = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp))
    (logp * grad_out).sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert (weight.grad is None) != trainable_head
    if trainable_head:
        assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_targets(backend):
    hidden, weight, bias, targets, grad_out = make_inputs(17, 30, 90, torch.float32)
    targets = targets.to(torch.int32)
    targets[::4] = 7  # token 7 doubles as the ignore marker here
    run_and_compare(backend, hidden, weight, bias, targets, grad_out, ignore_index=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(backend, dtype):
    """Logits in the thousands: the online log-sum-exp must neither overflow nor lose the target.

    Float32 logits near 3000 carry absolute rounding errors near 1e-4, which softmax turns into
    relative errors of that order: the bound is looser than for well-scaled logits.
    """
    inputs = make_inputs(21, 48, 200, dtype, ignore_every=4, logit_scale=3000.0)
    logp, grads = run_and_compare(backend, *inputs, tolerance=max(TOLERANCE[dtype], 1e-3))
    assert torch.isfinite(logp).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_predictions_keep_relative_precision(backend):
    """p_t -> 1: the hidden gradient is tiny and must not drown in cancellation."""
    hidden, weight, bias, targets, grad_out = make_inputs(13, 32, 100, torch.float32, logit_scale=1.0)
    weight[targets] += 4.0 * hidden / hidden.norm(dim=1, keepdim=True) ** 2 * 5.0
    run_and_compare(backend, hidden, weight, bias, targets, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, bias, targets, grad_out = make_inputs(15, 26, 77, torch.float32, ignore_every=3)
    strided_hidden = torch.stack([hidden, hidden], dim=2)[:, :, 0]
    assert not strided_hidden.is_contiguous() and torch.equal(strided_hidden, hidden)
    strided_weight = weight.t().contiguous().t()
    assert not strided_weight.is_contiguous()
    run_and_compare(backend, strided_hidden, strided_weight, bias, targets[::1], grad_out)


def test_triton_vocabulary_splits(monkeypatch):
    """Few rows: the forward splits V across programs and merges the partial log-sum-exps."""
    monkeypatch.setattr(triton_backend, "config_for", lambda hidden: triton_backend.KernelConfig(
        16, 32, 16, num_warps=1, num_stages=1, programs_wanted=8))
    run_and_compare("triton", *make_inputs(9, 40, 301, torch.float32, with_bias=True, ignore_every=4))


@pytest.mark.parametrize("with_bias", first_fast([False, True]))
def test_triton_backward_over_many_vocabulary_slabs(with_bias):
    """A scratch budget of one tile of columns: the backward walks V in many slabs (the last one
    ragged), each writing its slab of d_weight once and adding its share of d_hidden."""
    from fastpref import backends

    try:
        fastpref.set_scratch_bytes(1)
        run_and_compare("triton", *make_inputs(23, 40, 301, torch.float32, with_bias=with_bias, ignore_every=5))
        run_and_compare("triton", *make_inputs(23, 40, 301, torch.bfloat16, with_bias=with_bias, ignore_every=5))
    finally:
        fastpref.set_scratch_bytes(backends.DEFAULT_SCRATCH_BYTES)


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "1GB"])
def test_scratch_budget_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="scratch_bytes must be a positive int"):
        fastpref.set_scratch_bytes(value)


def test_backends_agree():
    inputs = make_inputs(29, 50, 203, torch.float32, with_bias=True, ignore_every=6, seed=1234)
    logp_torch, grads_torch = run_and_compare("torch", *inputs)
    logp_triton, grads_triton = run_and_compare("triton", *inputs)
    assert relative_error(logp_triton, logp_torch) <= 1e-5
    for a, b in zip(grads_triton, grads_torch):
        assert relative_error(a, b) <= 1e-5


def test_float64_on_torch_backend_is_exact_to_rounding():
    inputs = make_inputs(12, 20, 70, torch.float64, with_bias=True, ignore_every=5)
    hidden, weight, bias, targets, _ = inputs
    logp = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    assert logp.dtype == torch.float64
    assert relative_error(logp, reference_logprobs(hidden, weight, targets, bias)) <= 1e-12


def test_gradcheck_float64():
    hidden, weight, bias, targets, _ = make_inputs(6, 5, 19, torch.float64, with_bias=True,
                                                   ignore_every=4)
    args = tuple(x.detach().requires_grad_() for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fastpref.linear_logprobs(h, w, targets, bias=b, backend="torch"), args)


def test_auto_picks_the_native_backend():
    hidden, weight, _, targets, _ = make_inputs(5, 16, 20, torch.float32)
    expected = fastpref.linear_logprobs(hidden, weight, targets, backend="torch")
    got = fastpref.linear_logprobs(hidden, weight, targets)
    if DEVICE == "cpu":
        assert torch.equal(got, expected)
    assert "torch" in fastpref.available_backends(DEVICE)


def test_no_grad_skips_the_hidden_gradient_direction(monkeypatch):
    """Reference models run under no_grad: the torch backend must not pay for the backward."""
    seen = []
    forward = torch_backend.BACKEND.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["fold_hidden_gradient"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(torch_backend.BACKEND, "forward", spy)
    hidden, weight, _, targets, _ = make_inputs(5, 16, 20, torch.float32)
    with torch.no_grad():
        fastpref.linear_logprobs(hidden.requires_grad_(), weight, targets, backend="torch")
    fastpref.linear_logprobs(hidden, weight, targets, backend="torch")
    assert seen == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_torch_backend_gpu_layout_within_the_scratch_budget(monkeypatch, dtype, trainable_head):
    """The torch backend's GPU blocks (the Triton backend's frozen-head pass too) on the CPU, with a
    budget so small that the forward runs several row blocks and vocabulary slabs: the results
    hold, and each block's allocations fit the budget."""
    from fastpref import backends

    budget = 6 * 1024
    layouts = []

    def gpu_layout(num_rows, vocab, device, options, accumulator_width=0):
        rows, columns = torch_backend.gpu_block_sizes(num_rows, vocab, options.scratch_bytes, accumulator_width)
        layouts.append((rows, columns, accumulator_width))
        return rows, columns

    monkeypatch.setattr(torch_backend, "_block_sizes", gpu_layout)
    try:
        fastpref.set_scratch_bytes(budget)
        run_and_compare("torch", *make_inputs(37, 24, 301, dtype, with_bias=True, ignore_every=5),
                        trainable_head=trainable_head)
    finally:
        fastpref.set_scratch_bytes(backends.DEFAULT_SCRATCH_BYTES)
    rows, columns, width = next(layout for layout in layouts if layout[2])
    assert 1 < rows < 37 and columns < 301
    assert rows * width * 4 * 4 + rows * columns * (4 + 2) <= budget


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_sums_unrounded_logit_gradients(backend):
    """Two rows whose logit gradients nearly cancel (the same row, g = 1 and -0.999): d_bias is a
    thousandth of either term, so summing the bfloat16-rounded dz would miss it by ~100%."""
    hidden, weight, bias, targets, _ = make_inputs(1, 32, 300, torch.bfloat16, with_bias=True, seed=4)
    hidden, targets = hidden.expand(2, -1).contiguous(), targets.expand(2).contiguous()
    grad_out = torch.tensor([1.0, -0.999], device=hidden.device)
    leaf = bias.detach().requires_grad_()
    logp = fastpref.linear_logprobs(hidden, weight.requires_grad_(), targets, bias=leaf, backend=backend)
    (d_bias,) = torch.autograd.grad((logp * grad_out).sum(), [leaf])
    logits = hidden.double() @ weight.detach().double().T + bias.double()
    dz = -torch.softmax(logits, dim=1)
    dz[torch.arange(2, device=hidden.device), targets] += 1
    expected = (grad_out.double()[:, None] * dz).sum(dim=0)
    assert relative_error(d_bias, expected.to(torch.bfloat16)) <= 2**-7


def test_scratch_budget_is_a_per_call_argument(monkeypatch):
    """scratch_bytes= sets this call's slab width; the process-wide setter only its default."""
    budgets = []
    slab_columns = triton_backend.slab_columns

    def spy(num_rows, vocab, element_bytes, budget, multiple=1):
        budgets.append(budget)
        return slab_columns(num_rows, vocab, element_bytes, budget, multiple)

    monkeypatch.setattr(triton_backend, "slab_columns", spy)
    inputs = make_inputs(23, 40, 301, torch.float32, with_bias=True, ignore_every=5)
    hidden, weight, bias, targets, grad_out = inputs
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    narrow = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], backend="triton", scratch_bytes=1)
    narrow_grads = torch.autograd.grad((narrow * grad_out).sum(), leaves)
    wide = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], backend="triton")
    wide_grads = torch.autograd.grad((wide * grad_out).sum(), leaves)
    from fastpref.backends.scratch import scratch_bytes

    assert budgets == [1, scratch_bytes()]
    assert relative_error(narrow, wide) <= 1e-6
    for a, b in zip(narrow_grads, wide_grads):
        assert relative_error(a, b) <= 1e-5
