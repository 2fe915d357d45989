"""The CUDA backend: fastpref._C (csrc/) and backend="cuda".

On any machine: the extension imports (required wherever nvcc is available, unless
FASTPREF_BUILD_CUDA=0 declares a pure-Python install), its bound functions reject bad arguments
with a ValueError naming the argument before any CUDA call, CUDA failures surface as
RuntimeError, and the registry explains why "cuda" cannot run on CPU tensors.

On a GPU (marked gpu): the kernels against the float64 reference and against the Triton backend,
on odd shapes, every dtype, ignore patterns, frozen and trainable heads, many vocabulary slabs,
the compensated half-precision hidden gradient, misaligned rows, 64-bit offsets, side streams,
every logit transform and per-token output (each alone and all together, across slabs, with
masked columns, the entropy's gradient), and every loss type.
"""
import contextlib
import os
import re
import shutil

import pytest
import torch

import fastpref
from fastpref.backends import HeadOptions, cuda_backend, torch_backend
from fastpref.backends.scratch import scratch_bytes
from fastpref.logit_transform import LogitTransform
import test_head_outputs as head_tests
from reference import reference_head_outputs, reference_kto_loss, relative_error
from test_head_outputs import ALL_OUTPUTS, TRANSFORMS, run_and_compare_outputs
from test_linear_logprobs import DEVICE, TOLERANCE, make_inputs, run_and_compare
from test_head_loss import grouped_pass_and_expected
from test_losses import REFERENCE_WRITTEN, check, check_paired_loss, make_packed_batch

try:
    from fastpref import _C

    IMPORT_ERROR = None
except ImportError as exc:
    _C = None
    IMPORT_ERROR = str(exc)

BUILD_DISABLED = os.environ.get("FASTPREF_BUILD_CUDA", "").strip() == "0"
NVCC = shutil.which("nvcc") or (
    os.environ.get("CUDA_HOME") and shutil.which("nvcc", path=os.path.join(os.environ["CUDA_HOME"], "bin")))
EXTENSION_EXPECTED = bool(NVCC) and not BUILD_DISABLED

needs_extension = pytest.mark.skipif(
    _C is None,
    reason=f"fastpref._C is not built ({IMPORT_ERROR}); FASTPREF_BUILD_CUDA=1 pip install -e . builds it")


def test_extension_imports_wherever_nvcc_is_available():
    if _C is None:
        if EXTENSION_EXPECTED:
            pytest.fail(f"nvcc is at {NVCC} but fastpref._C does not import ({IMPORT_ERROR}). "
                        "Reinstall with FASTPREF_BUILD_CUDA=1 to see the build error, or set "
                        "FASTPREF_BUILD_CUDA=0 to declare a pure-Python install.")
        pytest.skip(f"pure-Python install (FASTPREF_BUILD_CUDA=0 or no nvcc): {IMPORT_ERROR}")
    assert (_C.DTYPE_FLOAT32, _C.DTYPE_FLOAT16, _C.DTYPE_BFLOAT16) == (0, 1, 2)
    assert all(callable(getattr(_C, name)) for name in ARGUMENTS)


# ---- argument validation of the bound functions ---------------------------------------------

FAKE = 1 << 20  # a non-null stand-in pointer: validation never dereferences pointers


def slab_softmax_arguments():
    return dict(logits=FAKE, bias=0, targets=FAKE, row_max=FAKE, sum_excl=FAKE, target_logit=FAKE,
                sum_all=FAKE, shifted=FAKE, sum_sq=0, logit_sum=FAKE, max_before=0, pre=0.8, post=2.5,
                softcap=True, num_rows=5, columns=100, slab_start=200, vocab=300, dtype=0, device=0, stream=0)


def slab_gradient_arguments():
    return dict(logits=FAKE, bias=FAKE, targets=FAKE, lse=FAKE, miss=FAKE, grad_logp=FAKE, entropy=FAKE,
                grad_entropy=FAKE, dz=FAKE, float32_dz_into_logits=True, pre=-1.5, post=1.0, softcap=False,
                num_rows=5, columns=300, slab_start=0, vocab=300, dtype=1, device=0, stream=0)


def accumulate_arguments():
    return dict(product=FAKE, hi=FAKE, lo=FAKE, count=80, dtype=2, device=0, stream=0)


ARGUMENTS = {
    "slab_softmax_update": slab_softmax_arguments,
    "slab_logit_gradient": slab_gradient_arguments,
    "compensated_accumulate": accumulate_arguments,
}
REQUIRED_POINTERS = {
    "slab_softmax_update": ["logits", "targets", "row_max", "sum_excl", "target_logit"],
    "slab_logit_gradient": ["logits", "targets", "lse", "miss", "grad_logp", "dz"],
    "compensated_accumulate": ["product", "hi", "lo"],
}
SIZES = {
    "slab_softmax_update": ["num_rows", "columns", "vocab"],
    "slab_logit_gradient": ["num_rows", "columns", "vocab"],
    "compensated_accumulate": ["count"],
}
OTHER_BAD_ARGUMENTS = [
    # (function, changes, argument named first in the message)
    ("slab_softmax_update", {"dtype": 3}, "dtype"),
    ("slab_softmax_update", {"dtype": -1}, "dtype"),
    ("slab_softmax_update", {"device": -1}, "device"),
    ("slab_softmax_update", {"columns": 301}, "columns"),  # wider than the vocabulary
    ("slab_softmax_update", {"slab_start": 201}, "slab_start"),  # past the vocabulary's end
    ("slab_softmax_update", {"slab_start": -1}, "slab_start"),
    # the logit transform: pre any finite float32 (a negative logit scale too), post > 0
    ("slab_softmax_update", {"pre": float("nan")}, "pre"),
    ("slab_softmax_update", {"pre": 1e39}, "pre"),  # finite as a double, inf as the kernel's float
    ("slab_softmax_update", {"post": 0.0}, "post"),
    ("slab_softmax_update", {"post": -2.5}, "post"),
    ("slab_softmax_update", {"post": float("inf")}, "post"),
    # the entropy's two sums come together
    ("slab_softmax_update", {"sum_all": 0}, "sum_all"),
    ("slab_softmax_update", {"shifted": 0}, "shifted"),
    ("slab_logit_gradient", {"pre": float("-inf")}, "pre"),
    ("slab_logit_gradient", {"post": float("nan")}, "post"),
    ("slab_logit_gradient", {"post": 1e-50}, "post"),  # 0 as the kernel's float
    ("slab_logit_gradient", {"entropy": 0}, "entropy"),
    ("slab_logit_gradient", {"grad_entropy": 0}, "grad_entropy"),
    ("slab_logit_gradient", {"dtype": 9}, "dtype"),
    ("slab_logit_gradient", {"device": -2}, "device"),
    ("slab_logit_gradient", {"slab_start": 1}, "slab_start"),
    ("slab_logit_gradient", {"num_rows": 1 << 31}, "num_rows"),
    ("compensated_accumulate", {"dtype": 0}, "dtype"),  # float32 needs no compensation
    ("compensated_accumulate", {"dtype": 5}, "dtype"),
    ("compensated_accumulate", {"device": -1}, "device"),
    ("compensated_accumulate", {"count": 1 << 40}, "count"),  # past grid.x
]


def _bad_argument_cases():
    for function, names in REQUIRED_POINTERS.items():
        for name in names:
            yield pytest.param(function, {name: 0}, name, id=f"{function}-null-{name}")
    for function, names in SIZES.items():
        for name in names:
            for value in (0, -3):
                yield pytest.param(function, {name: value}, name, id=f"{function}-{name}={value}")
    for function, changes, name in OTHER_BAD_ARGUMENTS:
        label = ",".join(f"{k}={v}" for k, v in changes.items())
        yield pytest.param(function, changes, name, id=f"{function}-{label}")


@needs_extension
@pytest.mark.parametrize("function, changes, argument", list(_bad_argument_cases()))
def test_bad_arguments_raise_value_error_naming_them(function, changes, argument):
    """Raised before any CUDA call: without a GPU, a CUDA call would raise RuntimeError instead."""
    arguments = {**ARGUMENTS[function](), **changes}
    with pytest.raises(ValueError, match="^" + re.escape(argument) + r"\b"):
        getattr(_C, function)(**arguments)


@needs_extension
@pytest.mark.parametrize("function", sorted(ARGUMENTS))
def test_cuda_failures_raise_runtime_error_with_the_cuda_message(function):
    """Valid arguments on a device that does not exist: the device guard's CUDA call fails (no
    kernel is launched, no pointer read) and the error comes back with CUDA's own words."""
    arguments = {**ARGUMENTS[function](), "device": 1000}
    with pytest.raises(RuntimeError, match=r"CUDA error cuda\w+ \(.+\) in cuda\w+"):
        getattr(_C, function)(**arguments)


# ---- registry --------------------------------------------------------------------------------

def test_cuda_is_registered_but_not_the_auto_choice_on_cpu():
    assert "cuda" in fastpref.registered_backends()
    assert "cuda" not in fastpref.available_backends("cpu")
    assert cuda_backend.BACKEND.priority < 10  # triton stays the "auto" choice on CUDA
    hidden, weight, _, targets, _ = make_inputs(4, 8, 10, torch.float32, seed=0)
    if not torch.cuda.is_available():
        auto = fastpref.linear_logprobs(hidden, weight, targets)
        assert torch.equal(auto, fastpref.linear_logprobs(hidden, weight, targets, backend="torch"))


def test_cuda_backend_on_cpu_tensors_says_why():
    hidden, weight, targets = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    why = "fastpref._C is not built.*FASTPREF_BUILD_CUDA=1" if _C is None else "need CUDA tensors"
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on device cpu: .*" + why):
        fastpref.linear_logprobs(hidden, weight, targets, backend="cuda")
    layout = fastpref.PackedLayout.paired(torch.tensor([0, 2, 6]), torch.ones(6, dtype=torch.bool),
                                          torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on device cpu"):
        fastpref.PreferenceLoss("sigmoid", backend="cuda")(
            torch.randn(6, 8), weight, torch.randint(0, 11, (6,)), layout, torch.randn(2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_unavailable_reason_without_a_device():
    reason = cuda_backend.BACKEND.unavailable_reason(torch.device("cuda"))
    if _C is None:
        assert "FASTPREF_BUILD_CUDA=1" in reason
    else:
        assert "torch sees no CUDA device" in reason


# ---- on the GPU ------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 16, 1), (3, 5, 2), (37, 70, 301), (65, 33, 129), (130, 96, 1000), (257, 200, 4099)]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("ignore_every", [0, 3], ids=["none-ignored", "some-ignored"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(dtype, trainable_head, ignore_every, shape):
    inputs = make_inputs(*shape, dtype, with_bias=trainable_head, ignore_every=ignore_every)
    run_and_compare("cuda", *inputs, trainable_head=trainable_head)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_all_rows_ignored(trainable_head):
    hidden, weight, bias, targets, grad_out = make_inputs(11, 24, 50, torch.bfloat16, with_bias=True)
    targets = torch.full_like(targets, -100)
    hidden.requires_grad_()
    weight.requires_grad_(trainable_head)
    bias.requires_grad_()
    logp = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend="cuda")
    assert torch.equal(logp, torch.zeros_like(logp))
    (logp * grad_out).sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert (weight.grad is None) != trainable_head


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_agrees_with_triton(dtype, trainable_head):
    inputs = make_inputs(333, 384, 5003, dtype, with_bias=trainable_head, ignore_every=5)
    logp_cuda, grads_cuda = run_and_compare("cuda", *inputs, trainable_head=trainable_head)
    logp_triton, grads_triton = run_and_compare("triton", *inputs, trainable_head=trainable_head)
    assert relative_error(logp_cuda, logp_triton) <= TOLERANCE[dtype]
    for ours, theirs in zip(grads_cuda, grads_triton):
        assert relative_error(ours, theirs) <= TOLERANCE[dtype]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1000, 1024, 32003), (4099, 576, 49157), (3, 2048, 128256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_realistic_shapes(dtype, shape):
    run_and_compare("cuda", *make_inputs(*shape, dtype, ignore_every=7))


@contextlib.contextmanager
def scratch_budget(value):
    """fastpref.set_scratch_bytes(value) within the block; the previous budget is restored after."""
    previous = scratch_bytes()
    fastpref.set_scratch_bytes(value)
    try:
        yield
    finally:
        fastpref.set_scratch_bytes(previous)


def slab_budget(num_rows, columns, dtype):
    """The scratch budget of slabs `columns` wide: float32 logits plus dz in dtype per element."""
    return num_rows * columns * (4 + torch.finfo(dtype).bits // 8)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_many_slabs_match_one_slab(dtype, with_bias):
    """Slabs of 37 columns (17 of them, the last ragged, targets in most) give the one-slab
    result: the online softmax carried across slabs, every slab of d_weight and d_bias written
    once, d_hidden accumulated over them."""
    rows, columns, vocab = 70, 37, 600
    inputs = make_inputs(rows, 64, vocab, dtype, with_bias=with_bias)
    with scratch_budget(1 << 30):
        assert cuda_backend._Slabs(inputs[0], inputs[1], scratch_bytes()).columns == vocab
        logp_one, grads_one = run_and_compare("cuda", *inputs)
    with scratch_budget(slab_budget(rows, columns, dtype)):
        assert cuda_backend._Slabs(inputs[0], inputs[1], scratch_bytes()).columns == columns
        logp_many, grads_many = run_and_compare("cuda", *inputs)
    assert relative_error(logp_many, logp_one) <= 1e-6
    for many, one in zip(grads_many, grads_one):
        assert relative_error(many, one) <= (1e-5 if dtype == torch.float32 else 2**-8)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_columns_whole_slabs_of_minus_infinity(dtype):
    """A bias of -inf on the first 50 columns (the whole first slab of 37 and part of the next)
    and the last 7: the running max stays -inf across a slab and the masked columns add exactly
    nothing, as in the float64 reference; no NaN anywhere."""
    rows, columns = 29, 37
    hidden, weight, bias, targets, grad_out = make_inputs(rows, 40, 300, dtype, with_bias=True)
    bias[:50] = float("-inf")
    bias[-7:] = float("-inf")
    targets = torch.randint(50, 293, (rows,), device=targets.device)
    with scratch_budget(slab_budget(rows, columns, dtype)):
        assert cuda_backend._Slabs(hidden, weight, scratch_bytes()).columns == columns
        run_and_compare("cuda", hidden, weight, bias, targets, grad_out)


@pytest.mark.gpu
@needs_extension
def test_compensated_hidden_gradient_rounds_about_once():
    """bfloat16 d_hidden summed over 50 slabs: its error against the float64 sum of the same
    bfloat16 logit gradients stays within 1.5x the error of rounding that sum once. Plain
    bfloat16 accumulation (rounded after every slab) misses that bound on the same inputs."""
    rows, width, vocab, columns = 40, 64, 1000, 20
    hidden, weight, _, targets, grad_out = make_inputs(rows, width, vocab, torch.bfloat16)
    with scratch_budget(slab_budget(rows, columns, torch.bfloat16)):
        assert cuda_backend._Slabs(hidden, weight, scratch_bytes()).columns == columns
        leaf = hidden.detach().requires_grad_()
        trainable = weight.detach().requires_grad_()  # a frozen head would take the torch backend
        logp = fastpref.linear_logprobs(leaf, trainable, targets, backend="cuda")
        d_hidden, _ = torch.autograd.grad((logp * grad_out).sum(), [leaf, trainable])

    # The backward's dz, rounded to bfloat16 as it enters the GEMMs; exact: its float64 product.
    logits = hidden.double() @ weight.double().T
    p = torch.softmax(logits, dim=1)
    g = grad_out.double()[:, None]
    dz = -g * p
    at_target = torch.arange(rows, device=hidden.device), targets
    dz[at_target] = g[:, 0] * (1 - p[at_target])
    dz = dz.to(torch.bfloat16).double()
    weight64 = weight.double()
    exact = dz @ weight64
    rounded_once = relative_error(exact.to(torch.bfloat16), exact)
    plain = torch.zeros_like(hidden)
    for start in range(0, vocab, columns):
        plain = (plain.double() + dz[:, start:start + columns] @ weight64[start:start + columns]).to(plain.dtype)
    assert relative_error(d_hidden, exact) <= 1.5 * rounded_once
    assert relative_error(plain, exact) > 1.5 * rounded_once


@pytest.mark.gpu
@needs_extension
def test_bias_gradient_sums_unrounded_logit_gradients():
    """Two rows whose logit gradients nearly cancel (the same row, g = 1 and -0.999): d_bias is a
    thousandth of either term, so summing the bfloat16-rounded dz would miss it by ~100%."""
    hidden, weight, bias, targets, _ = make_inputs(1, 32, 300, torch.bfloat16, with_bias=True, seed=4)
    hidden, targets = hidden.expand(2, -1), targets.expand(2)
    grad_out = torch.tensor([1.0, -0.999], device=hidden.device)
    leaf = bias.detach().requires_grad_()
    logp = fastpref.linear_logprobs(hidden, weight, targets, bias=leaf, backend="cuda")
    (d_bias,) = torch.autograd.grad((logp * grad_out).sum(), [leaf])
    logits = hidden.double() @ weight.double().T + bias.double()
    dz = -torch.softmax(logits, dim=1)
    dz[torch.arange(2, device=hidden.device), targets] += 1
    expected = (grad_out.double()[:, None] * dz).sum(dim=0)
    assert relative_error(d_bias, expected.to(torch.bfloat16)) <= 2**-7


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_head_takes_the_torch_backends_one_pass(dtype):
    """The op folds the hidden gradient into the forward (a frozen head, no entropy): the forward
    is the torch backend's slab pass that also returns u = W_t - sum_v p_v W_v, the backward its
    scale g u (4NHV in all)."""
    hidden, weight, bias, targets, grad_out = make_inputs(37, 48, 501, dtype, with_bias=True)
    options = HeadOptions()
    ours = cuda_backend.forward(hidden, weight, bias, targets, options, fold_hidden_gradient=True)
    theirs = torch_backend.forward(hidden, weight, bias, targets, options, fold_hidden_gradient=True)
    assert ours.hidden_grad_direction is not None
    for field in ("logp", "lse", "miss", "hidden_grad_direction"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    d_hidden, d_weight, d_bias = cuda_backend.backward(hidden, weight, bias, targets, ours, grad_out, None,
                                                       options, True, False, False)
    expected = torch_backend.backward(hidden, weight, bias, targets, theirs, grad_out, None, options,
                                      True, False, False)
    assert torch.equal(d_hidden, expected[0]) and d_weight is None and d_bias is None


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows_take_the_element_load_path(dtype):
    """Inputs starting one element past a 16-byte boundary: no 16-byte vector loads allowed."""
    hidden, weight, bias, targets, grad_out = make_inputs(45, 64, 777, dtype, with_bias=True)

    def shifted(x):
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = storage[1:].view(x.shape)
        view.copy_(x)
        return view

    assert shifted(hidden).data_ptr() % 16 != 0
    run_and_compare("cuda", shifted(hidden), shifted(weight), bias, targets, grad_out)


# ---- logit transforms and per-token outputs (tests/test_head_outputs.py's checks) ------------

TRANSFORMS_AND_NONE = {"none": {}, **TRANSFORMS}
# A one-column vocabulary (every output exact: p = 1), then odd shapes. No tiny vocabularies of a
# few columns: near-certain rows there have entropies and log sum p^2 near 0 that float32 sums
# cannot give to 1e-5 relative, whatever the backend (the torch backend misses too).
OUTPUT_SHAPES = [(2, 16, 1), (37, 70, 301), (65, 33, 129), (257, 200, 4099)]
EACH_OUTPUT = [("log_probs",), ("entropy",), ("log_sum_sq_probs",), ("mean_logits",), ("is_top1",)]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("transform", TRANSFORMS_AND_NONE.values(), ids=TRANSFORMS_AND_NONE.keys())
@pytest.mark.parametrize("shape", OUTPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_transforms_and_outputs_match_float64(transform, dtype, trainable_head, shape):
    """Every output at once, log_probs and entropy differentiated: the kernels' output and
    entropy-gradient variants, under each transform (a frozen head with the entropy runs the slab
    backward for d_hidden alone)."""
    inputs = make_inputs(*shape, dtype, with_bias=trainable_head, ignore_every=5)
    run_and_compare_outputs("cuda", *inputs, transform=transform, trainable_head=trainable_head)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("outputs", EACH_OUTPUT, ids=lambda o: o[0])
def test_each_output_alone_over_many_slabs(outputs, dtype, trainable_head):
    """Each output's sums alone (the others' pointers null), carried over 9 slabs of 37 columns, the
    soft cap on. A frozen head without the entropy takes the torch backend's one pass."""
    rows, columns = 23, 37
    inputs = make_inputs(rows, 40, 301, dtype, with_bias=True, ignore_every=4)
    with scratch_budget(slab_budget(rows, columns, dtype)):
        assert cuda_backend._Slabs(inputs[0], inputs[1], scratch_bytes()).columns == columns
        run_and_compare_outputs("cuda", *inputs, transform=TRANSFORMS["all"], outputs=outputs,
                                trainable_head=trainable_head)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_over_many_slabs_match_one_slab(dtype):
    """All outputs over 17 slabs of 37 columns (the last ragged) equal the one-slab result up to
    float32 rounding: the sums relative to the running maximum, the entropy's shift term, the
    first maximum before the target, merged slab after slab."""
    rows, columns, vocab = 70, 37, 600
    inputs = make_inputs(rows, 64, vocab, dtype, with_bias=True, ignore_every=6)
    results = []
    for budget in (1 << 30, slab_budget(rows, columns, dtype)):
        with scratch_budget(budget):
            results.append(run_and_compare_outputs("cuda", *inputs, transform=TRANSFORMS["all"]))
    (one, grads_one), (many, grads_many) = results
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert relative_error(getattr(many, name), getattr(one, name)) <= 1e-5, name
    for ours, theirs in zip(grads_many, grads_one):
        assert relative_error(ours, theirs) <= (1e-5 if dtype == torch.float32 else 2**-8)


@pytest.mark.gpu
@needs_extension
def test_soft_cap_bends_large_logits():
    head_tests.test_soft_cap_bends_large_logits("cuda")


@pytest.mark.gpu
@needs_extension
def test_entropy_gradient_alone():
    head_tests.test_entropy_gradient_alone("cuda")


@pytest.mark.gpu
@needs_extension
def test_entropy_used_as_a_metric_only():
    head_tests.test_entropy_used_as_a_metric_only("cuda")


@pytest.mark.gpu
@needs_extension
def test_is_top1_takes_the_first_maximum():
    """argmax's rule, in one slab (ties in one lane's columns and across lanes) and across slabs of
    7 columns: a tie with an earlier column is not top-1, with a later one it is."""
    head_tests.test_is_top1_takes_the_first_maximum("cuda")
    # row r's logits are the column of weight that hidden[r] picks: 1 at two tied columns, else 0
    ties = [(3, 20), (10, 11), (6, 45), (1, 33)]  # (1, 33): one lane's columns in a single slab
    picks = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0])
    targets = torch.tensor([3, 20, 11, 10, 45, 6, 33, 1, 0], device=DEVICE)
    weight = torch.zeros(50, len(ties))
    for feature, columns in enumerate(ties):
        weight[list(columns), feature] = 1.0
    hidden, weight = torch.eye(len(ties))[picks].to(DEVICE), weight.to(DEVICE)
    for columns in (50, 7):
        with scratch_budget(slab_budget(len(picks), columns, torch.float32)):
            assert cuda_backend._Slabs(hidden, weight, scratch_bytes()).columns == columns
            got = fastpref.linear_logprobs(hidden, weight, targets, outputs=("is_top1",), backend="cuda")
        assert got.is_top1.tolist() == [True, False, False, True, False, True, False, True, False], columns


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transform", [{}, dict(logit_scale=1.7, temperature=1.3)], ids=["none", "scale"])
def test_outputs_with_whole_slabs_of_minus_infinity(dtype, transform):
    """test_masked_columns_whole_slabs_of_minus_infinity with every output and the entropy's
    gradient: masked columns (z = -inf, p = 0) add nothing to any sum or gradient (no -inf * 0),
    so everything equals the float64 reference over the unmasked columns alone, but mean_logits,
    which is -inf as the mean of the full row."""
    rows, columns, first, stop = 29, 37, 50, 293
    hidden, weight, bias, _, grad_out = make_inputs(rows, 40, 300, dtype, with_bias=True)
    bias[:first] = float("-inf")
    bias[stop:] = float("-inf")
    targets = torch.randint(first, stop, (rows,), device=hidden.device)
    targets[::5] = -100
    grad_entropy = torch.randn(rows, device=hidden.device)
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
    with scratch_budget(slab_budget(rows, columns, dtype)):
        assert cuda_backend._Slabs(hidden, weight, scratch_bytes()).columns == columns
        got = fastpref.linear_logprobs(*leaves[:2], targets, bias=leaves[2], outputs=ALL_OUTPUTS, backend="cuda",
                                       **transform)
        grads = torch.autograd.grad((got.log_probs * grad_out + got.entropy * grad_entropy).sum(), leaves)

    unmasked = [hidden, weight[first:stop], bias[first:stop]]
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in unmasked]
    ref = reference_head_outputs(*ref_leaves[:2], torch.where(targets == -100, targets, targets - first),
                                 ref_leaves[2], **transform)
    ref_grads = torch.autograd.grad((ref["log_probs"] * grad_out.double().cpu()
                                     + ref["entropy"] * grad_entropy.double().cpu()).sum(), ref_leaves)
    kept = (targets != -100).cpu()
    for name in ("log_probs", "entropy", "log_sum_sq_probs"):
        assert relative_error(getattr(got, name), ref[name]) <= TOLERANCE[dtype], name
    decided = ref["top_gap"] > 1e-3
    assert torch.equal(got.is_top1.cpu()[decided], ref["is_top1"][decided])
    mean_logits = got.mean_logits.cpu()
    assert torch.all(mean_logits[kept] == float("-inf")) and torch.all(mean_logits[~kept] == 0)
    d_hidden, d_weight, d_bias = (grad.cpu() for grad in grads)
    assert relative_error(d_hidden, ref_grads[0]) <= TOLERANCE[dtype]
    for grad, ref_grad in ((d_weight, ref_grads[1]), (d_bias, ref_grads[2])):
        assert relative_error(grad[first:stop], ref_grad) <= TOLERANCE[dtype]
        assert torch.all(grad[:first] == 0) and torch.all(grad[stop:] == 0)


@pytest.mark.gpu
@needs_extension
def test_realistic_shape_with_soft_cap_and_every_output():
    inputs = make_inputs(1000, 1024, 32003, torch.bfloat16, with_bias=True, ignore_every=7, logit_scale=30.0)
    run_and_compare_outputs("cuda", *inputs, transform=dict(softcap=30.0, temperature=0.7))


@pytest.mark.gpu
@needs_extension
def test_side_stream_and_second_device():
    """Kernels go on the current stream of the inputs' device, whatever device is current."""
    inputs = make_inputs(50, 40, 300, torch.float32, with_bias=True, seed=5)
    hidden, weight, bias, targets, _ = inputs
    expected = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, expected)
    if torch.cuda.device_count() > 1:
        moved = [None if x is None else x.to("cuda:1") for x in (hidden, weight, bias, targets)]
        with torch.cuda.device(0):
            on_second = fastpref.linear_logprobs(moved[0], moved[1], moved[3], bias=moved[2],
                                                 backend="cuda")
        # Another GPU model may split the vocabulary differently: equal up to rounding.
        assert relative_error(on_second, expected) <= 1e-6


@pytest.mark.gpu
@needs_extension
def test_vocabulary_past_32_bit_offsets():
    """V * H > 2^31: the last vocabulary rows' offsets overflow int32 unless indexed in int64.

    Trainable head, so the weight gradient's slabs reach those rows too; the reference runs in
    float64 on the GPU, chunked over V.
    """
    n, h, v = 24, 8_200, 262_147
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * (3.0 / h**0.5)).to(torch.bfloat16)
    weight.requires_grad_()
    targets = torch.randint(v - 1000, v, (n,), device="cuda", generator=gen)
    logp = fastpref.linear_logprobs(hidden, weight, targets, backend="cuda")
    grad_out = torch.randn(n, device="cuda", generator=gen)
    d_hidden, d_weight = torch.autograd.grad((logp * grad_out).sum(), [hidden, weight])

    h64 = hidden.detach().double()
    chunks = range(0, v, 32_768)
    logits = torch.cat([h64 @ weight[i:i + 32_768].detach().double().T for i in chunks], dim=1)
    ref_logp = torch.log_softmax(logits, dim=1)
    dz = -ref_logp.exp() * grad_out.double()[:, None]
    dz[torch.arange(n), targets] += grad_out.double()
    ref_d_hidden = sum(dz[:, i:i + 32_768] @ weight[i:i + 32_768].detach().double() for i in chunks)
    tail = slice(v - 4096, v)
    ref_d_weight_tail = dz[:, tail].T @ h64
    assert relative_error(logp, ref_logp.gather(1, targets[:, None])[:, 0]) <= TOLERANCE[torch.bfloat16]
    assert relative_error(d_hidden, ref_d_hidden) <= TOLERANCE[torch.bfloat16]
    assert relative_error(d_weight[tail], ref_d_weight_tail) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", REFERENCE_WRITTEN)
def test_each_paired_loss_matches_its_reference(dtype, loss_type):
    check_paired_loss("cuda", dtype, loss_type)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("average_logps", [False, True])
def test_kto_matches_its_reference(average_logps):
    hidden, weight, targets, layout, reference = make_packed_batch(4, 20, 71, torch.float32, unpaired=True)
    module = fastpref.PreferenceLoss("kto", beta=0.15, desirable_weight=1.3, undesirable_weight=0.8,
                                     average_logps=average_logps, backend="cuda")

    def ref_loss(seq, lengths):
        return reference_kto_loss(seq, lengths, layout.desirable.tolist(), reference.double().cpu(),
                                  beta=0.15, kl=0.4, desirable_weight=1.3, undesirable_weight=0.8,
                                  average=average_logps)

    check(module, hidden, weight, targets, layout, reference, ref_loss, 1e-5, kto_kl=0.4)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("types", [list(REFERENCE_WRITTEN[:5]) + ["apo_zero", "apo_down", "sft"],
                                   ["simpo", "orpo"], ["kto"]], ids=["with-reference", "reference-free", "kto"])
def test_losses_agree_with_triton_on_every_part(types):
    unpaired = types == ["kto"]
    hidden, weight, targets, layout, reference = make_packed_batch(9, 32, 150, torch.float32,
                                                                   seed=3, unpaired=unpaired)
    options = {} if unpaired else {"label_smoothing": 0.05}
    needs_ref = fastpref.LossSpec.build(types).needs_reference
    results = {}
    for backend in ("cuda", "triton"):
        h = hidden.detach().requires_grad_()
        loss, metrics = fastpref.PreferenceLoss(types, beta=0.2, backend=backend, **options)(
            h, weight, targets, layout, reference if needs_ref else None)
        (d_h,) = torch.autograd.grad(loss, [h])
        results[backend] = loss, metrics, d_h
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = results["cuda"], results["triton"]
    assert relative_error(loss_a, loss_b) <= 1e-5
    assert relative_error(grad_a, grad_b) <= 1e-5
    assert set(metrics_a) == set(metrics_b)
    for key in metrics_a:
        assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), rel=1e-5, abs=1e-6), key


@pytest.mark.gpu
@needs_extension
def test_small_case_for_compute_sanitizer():
    """Tiny shapes through every kernel, quick enough for the sanitizers:

        compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_backend.py -k sanitizer
        compute-sanitizer --tool racecheck python -m pytest tests/test_cuda_backend.py -k sanitizer
        compute-sanitizer --tool synccheck python -m pytest tests/test_cuda_backend.py -k sanitizer
    """
    for dtype in DTYPES:
        run_and_compare("cuda", *make_inputs(5, 24, 200, dtype, with_bias=True, ignore_every=2))
        run_and_compare("cuda", *make_inputs(70, 40, 130, dtype), trainable_head=False)
        for transform in TRANSFORMS.values():
            run_and_compare_outputs("cuda", *make_inputs(5, 24, 200, dtype, with_bias=True, ignore_every=2),
                                    transform=transform)
    hidden, weight, targets, layout, reference = make_packed_batch(2, 16, 40, torch.float32, seed=9)
    loss, _ = fastpref.PreferenceLoss(["sigmoid", "sft"], backend="cuda")(
        hidden, weight, targets, layout, reference)
    assert torch.isfinite(loss)
    hidden, weight, targets, layout, reference = make_packed_batch(2, 16, 40, torch.float32, seed=9,
                                                                   unpaired=True)
    loss, _ = fastpref.PreferenceLoss("kto", backend="cuda")(hidden, weight, targets, layout, reference)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


# ---- the loss with its gradients in the forward (fastpref.head_loss) -------------------------

def _loss_and_gradients(loss_fn, hidden, weight, bias, targets, layout, reference):
    leaves = [None if tensor is None else tensor.detach().clone().requires_grad_() for tensor in (hidden, weight, bias)]
    loss, _ = loss_fn(leaves[0], leaves[1], targets, layout, reference, bias=leaves[2])
    (3.0 * loss).backward()
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def _float64_loss_and_gradients(hidden, weight, bias, targets, layout, reference, beta, transform):
    """DPO through float64 [N, V] logits under the logit transform, backward of 3 x the loss."""
    leaves = [None if tensor is None else tensor.detach().double().requires_grad_() for tensor in (hidden, weight, bias)]
    x = leaves[0] @ leaves[1].t() + (0.0 if bias is None else leaves[2])
    logits = transform.pre * x if transform.softcap is None else transform.post * torch.tanh(transform.pre * x)
    kept = layout.response_mask
    logp = torch.where(kept, logits.log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    sums = torch.zeros(layout.num_sequences, dtype=torch.float64, device=logp.device).index_add(
        0, layout.sequence_ids, logp) - reference.double()
    loss = -torch.nn.functional.logsigmoid(beta * (sums[layout.chosen_index] - sums[layout.rejected_index])).mean()
    (3.0 * loss).backward()
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def test_a_groups_slab_is_cut_into_row_segments_for_the_epilogues():
    """_Segments: a [3, 16] slab of columns [8, 24) without a bias is 48 rows of one column, each
    segment's target shifted to its own column (in it for exactly one segment of each row whose
    target is in the slab); with a bias, or an odd width, the slab as it is."""
    targets = torch.tensor([9, 23, 5])
    segments = cuda_backend._Segments(3, 8, 24, False, targets)
    assert (segments.count, segments.start, segments.stop) == (16, 0, 1)
    assert segments.view(torch.zeros(3, 16)).shape == (48, 1)
    hits = (segments.targets == 0).view(3, 16)
    assert hits[0].nonzero().flatten().tolist() == [1] and hits[1].nonzero().flatten().tolist() == [15]
    assert not hits[2].any()
    assert segments.repeat(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0] * 16 + [2.0] * 16 + [3.0] * 16
    for has_bias, stop in ((True, 24), (False, 23)):
        plain = cuda_backend._Segments(3, 8, stop, has_bias, targets)
        assert (plain.count, plain.start, plain.stop) == (1, 8, stop) and plain.targets is targets
    assert cuda_backend._Segments(4096, 0, 131072, False, targets).count == cuda_backend.EPILOGUE_ROWS // 4096


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_rows", [1, 9, 10_000], ids=["pair-groups", "groups-of-9", "one-group"])
@pytest.mark.parametrize("softcap", [None, 2.5], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gradients_in_forward_match_float64_logits(dtype, group_rows, softcap, with_bias):
    """PreferenceLoss(backend="cuda", gradients_in_forward=True): DPO's loss and the gradients of
    hidden, weight and bias against autograd through float64 logits, with one pair per group,
    several pairs per group (the weight gradient accumulated in float32 across groups) and all
    pairs in one group (written once), with and without a soft cap, with a bias and without one
    (V = 304 = 16 x 19: the epilogues then see each row as 16 segments); the two-op path alike."""
    hidden, weight, targets, layout, reference = make_packed_batch(7, 24, 304, dtype, seed=5)
    bias = (0.3 * torch.randn(304, device=hidden.device)).to(dtype) if with_bias else None
    options = dict(beta=0.5, softcap=softcap, logit_scale=1.2, temperature=0.9, backend="cuda")
    loss_fn = fastpref.PreferenceLoss("sigmoid", gradients_in_forward=True, group_rows=group_rows, **options)
    loss, grads = _loss_and_gradients(loss_fn, hidden, weight, bias, targets, layout, reference)
    expected_loss, expected = _float64_loss_and_gradients(hidden, weight, bias, targets, layout, reference, 0.5,
                                                          loss_fn.transform)
    two_op_loss, two_op = _loss_and_gradients(fastpref.PreferenceLoss("sigmoid", gradients_in_forward=False,
                                                                      **options),
                                              hidden, weight, bias, targets, layout, reference)
    tolerance = TOLERANCE[dtype]
    assert relative_error(loss, expected_loss) < tolerance
    assert relative_error(two_op_loss, expected_loss) < tolerance
    for got, two_op_got, want in zip(grads[:2 + with_bias], two_op, expected):
        assert got.dtype == dtype
        assert relative_error(got, want) < tolerance
        assert relative_error(two_op_got, want) < tolerance


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("store_columns", [0, 8, 11, 40], ids=["one-column", "8-columns", "11-columns",
                                                                 "whole-vocabulary"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gradients_in_forward_with_a_store_narrower_than_the_vocabulary(dtype, store_columns, with_bias):
    """cuda_backend.forward_backward_by_groups with a store of a few columns per row (the first
    slab kept, the others recomputed; d_hidden then summed over slabs in float32; without a bias
    the epilogues see slabs of 8 and 40 columns as 8 segments per row, and a ragged last slab
    as it is), three groups of uneven sizes, soft cap: the torch backend's forward and backward
    with the same per-row gradient."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(23, 16, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(40, 16, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(40, generator=gen).to(dtype).to(DEVICE) if with_bias else None
    targets = torch.randint(0, 40, (23,), generator=gen).to(DEVICE)
    g = torch.randn(23, generator=gen).to(DEVICE)
    (logp, d_hidden, d_weight, d_bias), (expected_logp, *expected) = grouped_pass_and_expected(
        cuda_backend.forward_backward_by_groups, hidden, weight, bias, targets, g,
        HeadOptions(LogitTransform(1.2, 3.0, 0.9)), store_bytes=store_columns * 15 * 4)
    assert relative_error(logp, expected_logp) < 1e-5
    assert (d_bias is None) == (not with_bias)
    for got, want, name in zip((d_hidden, d_weight, d_bias)[:2 + with_bias], expected, ("hidden", "weight", "bias")):
        assert got.dtype == dtype, name
        assert relative_error(got, want) < TOLERANCE[dtype], name
