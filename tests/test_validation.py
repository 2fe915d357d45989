"""Bad input gets a clear TypeError/ValueError naming the argument.

Shapes, dtypes and arguments are checked on the host before any kernel runs. Bad targets are
found on the device: they raise at once with check=True, otherwise at
fastpref.raise_pending_errors() or at the next call once their flags have reached the host, never
with a silent wrong answer left standing. NaN and inf in the inputs go through to the log-probs
and the gradients, as in PyTorch, and are raised at once with check=True or by
raise_pending_errors(non_finite=True)."""
import pytest
import torch

import fastpref

BACKENDS = ["torch", "triton"]


def good(n=6, h=8, v=11, dtype=torch.float32):
    return torch.randn(n, h, dtype=dtype), torch.randn(v, h, dtype=dtype), torch.randint(0, v, (n,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda h, w, t: (h[None], w, t), ValueError, r"hidden must be 2-D \[N, H\]"),
        (lambda h, w, t: (h, w[0], t), ValueError, r"weight must be 2-D \[V, H\]"),
        (lambda h, w, t: (h, w[:, :5], t), ValueError, r"weight must be \[V, H\] with H = .* = 8"),
        (lambda h, w, t: (h, w, t[:-1]), ValueError, r"targets must be 1-D of length N = .* = 6"),
        (lambda h, w, t: (h, w, t[:, None]), ValueError, r"targets must be 1-D"),
        (lambda h, w, t: (h[:0], w, t[:0]), ValueError, r"N = 0 rows"),
        (lambda h, w, t: (h[:, :0], w[:, :0], t), ValueError, r"H = 0"),
        (lambda h, w, t: (h, w[:0], t), ValueError, r"V = 0"),
        (lambda h, w, t: (h, w.double(), t), TypeError, r"weight dtype must equal hidden dtype"),
        (lambda h, w, t: (h.int(), w.int(), t), TypeError, r"hidden must be float16, bfloat16"),
        (lambda h, w, t: (h, w, t.float()), TypeError, r"targets must be an integer tensor"),
        (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
    ],
    ids=["hidden-3d", "weight-1d", "width-mismatch", "targets-length", "targets-2d", "empty",
         "zero-width", "empty-vocab", "dtype-mismatch", "integer-hidden", "float-targets",
         "numpy-hidden"],
)
def test_bad_inputs_raise_clear_errors(backend, mutate, error, message):
    hidden, weight, targets = mutate(*good())
    with pytest.raises(error, match=message):
        fastpref.linear_logprobs(hidden, weight, targets, backend=backend)


def raises_now_or_later(mode, message, call):
    """`call` raises ValueError(message) at once (check=True), at raise_pending_errors, or at the
    next call of the op; until then its bad rows are 0, never NaN."""
    if mode == "check":
        with pytest.raises(ValueError, match=message):
            call(check=True)
        return
    call()  # returns: nothing is read on the host during the call
    with pytest.raises(ValueError, match=message):
        if mode == "pending":
            fastpref.raise_pending_errors()
        else:
            hidden, weight, targets = good()
            fastpref.linear_logprobs(hidden, weight, targets)
    fastpref.raise_pending_errors()  # consumed: nothing left over


@pytest.mark.parametrize("mode", ["check", "pending", "next-call"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "targets, message",
    [([11] * 6, r"targets must lie in \[0, V = 11\) or equal ignore_index = -100; 6 do not, the first at position 0"),
     ([0, 1, -100, -1, 2, 3], r"1 do not, the first at position 3 \(value -1\)")],
    ids=["target-too-large", "negative-target"])
def test_bad_targets_raise_at_once_or_later(mode, backend, targets, message):
    hidden, weight, _ = good()
    targets = torch.tensor(targets)

    def call(**check):
        logp = fastpref.linear_logprobs(hidden, weight, targets, backend=backend, **check)
        bad = (targets < 0) & (targets != -100) | (targets >= 11)
        assert torch.equal(logp[bad], torch.zeros_like(logp[bad]))
        return logp

    raises_now_or_later(mode, message, call)


@pytest.mark.parametrize("mode", ["check", "pending"])
def test_wrong_num_kept_is_named(mode):
    hidden, weight, targets = good()
    targets[2] = -100
    raises_now_or_later(mode, r"num_kept = 4, but 5 targets are not ignore_index = -100",
                        lambda **check: fastpref.linear_logprobs(hidden, weight, targets, num_kept=4, **check))


@pytest.mark.parametrize("value", [-1, 7, 2.0, True])
def test_num_kept_outside_its_range(value):
    hidden, weight, targets = good()
    with pytest.raises(ValueError, match=r"num_kept must be None or an int in \[0, N = 6\]"):
        fastpref.linear_logprobs(hidden, weight, targets, num_kept=value)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(softcap=0.0), ValueError, r"softcap must be > 0 \(or None for no soft cap\), got 0.0"),
    (dict(softcap=-30.0), ValueError, r"softcap must be > 0"),
    (dict(temperature=0.0), ValueError, r"temperature must be > 0, got 0.0"),
    (dict(temperature=-1.0), ValueError, r"temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite"),
    (dict(logit_scale=float("inf")), ValueError, r"logit_scale must be finite"),
    (dict(logit_scale="2"), TypeError, r"logit_scale must be a real number, got str"),
    (dict(softcap=True), TypeError, r"softcap must be a real number, got bool"),
    (dict(outputs=("entropy", "logits")), ValueError, r"outputs names \['logits'\], which are not among"),
    (dict(outputs="entropy"), TypeError, r"outputs must be a tuple of names"),
    (dict(scratch_bytes=0), ValueError, r"scratch_bytes must be a positive int, got 0"),
    (dict(check=1), TypeError, r"check must be True or False"),
], ids=["softcap-zero", "softcap-negative", "temperature-zero", "temperature-negative", "temperature-nan",
        "scale-inf", "scale-str", "softcap-bool", "unknown-output", "outputs-string", "scratch-zero", "check-int"])
def test_bad_options_are_named(arguments, error, message):
    hidden, weight, targets = good()
    with pytest.raises(error, match=message):
        fastpref.linear_logprobs(hidden, weight, targets, **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_bias(backend):
    hidden, weight, targets = good()
    with pytest.raises(ValueError, match=r"bias must be 1-D of length V = 11"):
        fastpref.linear_logprobs(hidden, weight, targets, bias=torch.zeros(10), backend=backend)
    with pytest.raises(TypeError, match=r"bias dtype must equal hidden dtype"):
        fastpref.linear_logprobs(hidden, weight, targets, bias=torch.zeros(11, dtype=torch.float64),
                                 backend=backend)


def test_bad_ignore_index():
    hidden, weight, targets = good()
    with pytest.raises(TypeError, match=r"ignore_index must be an int"):
        fastpref.linear_logprobs(hidden, weight, targets, ignore_index=-100.0)


def test_unknown_backend_lists_the_known_ones():
    hidden, weight, targets = good()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['cuda', 'torch', 'triton'\], got 'cudnn'"):
        fastpref.linear_logprobs(hidden, weight, targets, backend="cudnn")
    with pytest.raises(TypeError, match=r"backend must be a string"):
        fastpref.linear_logprobs(hidden, weight, targets, backend=None)


def test_float64_is_refused_by_triton():
    hidden, weight, targets = good(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend 'triton' supports float16, bfloat16, float32"):
        fastpref.linear_logprobs(hidden, weight, targets, backend="triton")


def test_unavailable_backend_says_why(monkeypatch):
    from fastpref.backends import triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    hidden, weight, targets = good()
    if torch.cuda.is_available():
        pytest.skip("the triton backend is available on CUDA")
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run on device cpu: .*CUDA tensors"):
        fastpref.linear_logprobs(hidden, weight, targets, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    hidden, weight, targets = good()
    with pytest.raises(ValueError, match=r"all inputs must be on one device, got hidden on cuda:0"):
        fastpref.linear_logprobs(hidden.cuda(), weight, targets.cuda())


def test_mixed_devices_on_meta():
    """Mixed devices are caught on the host even without a GPU (meta tensors stand in)."""
    hidden, weight, targets = good()
    with pytest.raises(ValueError, match=r"all inputs must be on one device, got hidden on cpu, weight on meta"):
        fastpref.linear_logprobs(hidden, weight.to("meta"), targets)


def lets_non_finite_through(mode, message, call):
    """`call` raises ValueError(message) at once with check=True; without, its NaN and inf go
    through as in PyTorch: neither raise_pending_errors() nor the next call raises, and
    raise_pending_errors(non_finite=True) raises it afterwards."""
    if mode == "check":
        with pytest.raises(ValueError, match=message):
            call(check=True)
        return
    call()
    if mode == "asked":
        with pytest.raises(ValueError, match=message):
            fastpref.raise_pending_errors(non_finite=True)
    else:
        hidden, weight, targets = good()
        fastpref.linear_logprobs(hidden, weight, targets)  # the next call does not raise
        fastpref.raise_pending_errors()
    fastpref.raise_pending_errors(non_finite=True)  # consumed: nothing left over


@pytest.mark.parametrize("mode", ["check", "asked", "unasked"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_goes_through_and_names_its_first_row_when_asked(mode, backend, bad):
    hidden, weight, targets = good()
    targets[1] = -100  # an ignored row does not count, whatever it holds
    hidden[1, 0] = hidden[4, 3] = hidden[5, 0] = bad
    hidden.requires_grad_()

    def call(**check):
        logp = fastpref.linear_logprobs(hidden, weight, targets, backend=backend, **check)
        assert logp[1] == 0 and torch.isfinite(logp[[0, 2, 3]]).all()
        assert not torch.isfinite(logp[[4, 5]]).any()  # as log_softmax gives them
        logp.sum().backward()
        assert torch.isfinite(hidden.grad[[0, 1, 2, 3]]).all() and not torch.isfinite(hidden.grad[[4, 5]]).all()
        hidden.grad = None
        return logp

    lets_non_finite_through(
        mode, r"non-finite log-probability at row 4 \(2 rows in all\): hidden row 4 holds NaN or inf", call)
    hidden, weight, targets = good()
    hidden[:, 0] = 1.0
    weight[targets[2], 0] = bad  # enters every row's log-sum-exp
    lets_non_finite_through(
        mode, r"row 0 \(6 rows in all\): hidden row 0 is finite, so weight or bias holds NaN or inf",
        lambda **check: fastpref.linear_logprobs(hidden, weight, targets, backend=backend, **check))


@pytest.mark.parametrize("gradients_in_forward", [False, None])
def test_non_finite_hidden_goes_through_the_preference_loss(gradients_in_forward):
    """NaN reaches the loss and the gradients (so a GradScaler skips the step), is counted in the
    metrics, and is raised only when asked for."""
    from test_losses import make_packed_batch

    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 20, torch.float32)
    row = int((targets != -100).nonzero()[3, 0])
    hidden = hidden.detach().clone()
    hidden[row] = float("nan")
    hidden.requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss_fn = fastpref.PreferenceLoss("sigmoid", gradients_in_forward=gradients_in_forward)
    loss, metrics = loss_fn(hidden, weight, targets, layout, reference)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(weight.grad).any()
    assert metrics["non_finite_logps"] == pytest.approx(1 / 6)  # one of the six sequences
    fastpref.raise_pending_errors()
    loss_fn(hidden, weight, targets, layout, reference)
    with pytest.raises(ValueError, match=rf"non-finite log-probability at row {row} .*hidden row {row} holds NaN"):
        fastpref.raise_pending_errors(non_finite=True)
    with pytest.raises(ValueError, match=rf"non-finite log-probability at row {row}"):
        fastpref.PreferenceLoss("sigmoid", gradients_in_forward=gradients_in_forward, check=True)(
            hidden, weight, targets, layout, reference)


def test_a_deferred_error_names_the_call_that_flagged_it():
    hidden, weight, targets = good()
    targets[2] = 11
    line = test_a_deferred_error_names_the_call_that_flagged_it.__code__.co_firstlineno + 4
    fastpref.linear_logprobs(hidden, weight, targets)  # flagged here, raised below
    with pytest.raises(ValueError, match=rf"the first at position 2 .*\[found after the call that flagged it "
                                         rf"returned: the call at .*test_validation.py:{line} \(test_a_deferred"):
        fastpref.raise_pending_errors()
