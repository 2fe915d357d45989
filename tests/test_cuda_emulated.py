"""The CUDA backend's kernels (csrc/) on the CPU, through an emulation of CUDA: their logic checked
against the float64 references and the Triton backend on machines without a GPU (on a GPU,
test_cuda_backend.py runs the real kernels and these tests skip).

cuda_emulation/build.py compiles csrc/ with g++ against cuda_emulation/cuda_emulation.h, a CPU
stand-in for the CUDA headers (one OS thread per CUDA thread; the header says what it models and
what it checks), into a module with the interface of fastpref._C that takes CPU pointers. It is
built once and cached in pytest's cache folder (.pytest_cache) under a hash of its inputs, so that
only a change to csrc/ or to the harness rebuilds it. Each test points backend="cuda" at that
module (monkeypatched into fastpref.backends.cuda_backend for that test only; fastpref._C itself
is never touched) and calls a GPU test of test_cuda_backend.py with CPU tensors, on shapes small
enough for the emulation: a few blocks per launch.

Not checked here: speed, anything only nvcc and the hardware see (the device compiler, the memory
model, concurrently running blocks), cuBLAS itself (the GEMMs between the kernels are torch's CPU
matmuls here), and the 64-bit offset tests, too large to emulate.

For a deeper check by hand, FASTPREF_EMULATION_SANITIZER=address or thread builds the module with
that sanitizer. The address sanitizer reports out-of-bounds accesses to global and shared memory,
the thread sanitizer data races between the threads of a block, such as a missing __syncthreads():

    FASTPREF_EMULATION_SANITIZER=address ASAN_OPTIONS=detect_leaks=0 \\
        LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
        python -m pytest -s tests/test_cuda_emulated.py
    FASTPREF_EMULATION_SANITIZER=thread OMP_NUM_THREADS=1 \\
        LD_PRELOAD="$(g++ -print-file-name=libtsan.so) $(g++ -print-file-name=libstdc++.so)" \\
        python -m pytest -s tests/test_cuda_emulated.py

Python is built without the sanitizer, so its runtime must be preloaded, and libstdc++ with it for
the sanitizer to intercept C++ exceptions; -s lets a report reach the terminal even when the
sanitizer ends the process; OMP_NUM_THREADS=1 keeps torch's (uninstrumented) OpenMP threads out of
the thread sanitizer's reports. Any report makes the run exit with a non-zero status.
"""
import os

import pytest
import torch

import test_cuda_backend as gpu_tests
from cuda_emulation import build

pytestmark = pytest.mark.cuda_emulation
from fastpref.backends import cuda_backend
from reference import relative_error
from test_linear_logprobs import TOLERANCE, make_inputs, run_and_compare
from tiers import first_fast

SANITIZER = os.environ.get("FASTPREF_EMULATION_SANITIZER") or None
DTYPES = gpu_tests.DTYPES
# test_cuda_backend.SHAPES but the largest: one to seventeen blocks of rows (a partial last one),
# slabs narrower and wider than a warp.
SHAPES = [(1, 16, 1), (3, 5, 2), (37, 70, 301), (65, 33, 129), (130, 96, 1000)]


@pytest.fixture(scope="session")
def emulated_extension(request, tmp_path_factory):
    """The emulated module, built on first use in this session unless cached from an earlier one."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the tests' inputs live on it, and "
                    "test_cuda_backend.py runs the real kernels")
    needed = [("g++", build.compiler()), ("Python.h", build.python_headers())]
    missing = [name for name, found in needed if not found]
    if missing:
        pytest.skip(f"building the emulated CUDA kernels needs {' and '.join(missing)}, not found")
    if SANITIZER not in build.SANITIZER_FLAGS:
        pytest.fail("FASTPREF_EMULATION_SANITIZER must be address, thread or unset, "
                    f"got {SANITIZER!r}")
    if SANITIZER and f"lib{SANITIZER[0]}san" not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail(f"the {SANITIZER} sanitizer's runtime must be preloaded: see the docstring of "
                    f"{__name__} for the command")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("cuda_emulation") if cache else tmp_path_factory.mktemp("cuda_emulation")
    return build.load(build.build(folder, SANITIZER))


@pytest.fixture(autouse=True)
def emulated_cuda_backend(emulated_extension, monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors."""
    monkeypatch.setattr(cuda_backend, "_C", emulated_extension)
    monkeypatch.setattr(cuda_backend, "_IMPORT_ERROR", None)
    monkeypatch.setattr(cuda_backend.BACKEND, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(cuda_backend, "_launch_on", lambda tensor: {"device": 0, "stream": 0})
    monkeypatch.setattr(gpu_tests, "_C", emulated_extension)


# ---- bindings.cpp, which test_cuda_backend.py checks only where the real module is built ----

@pytest.mark.parametrize("function, changes, argument", list(gpu_tests._bad_argument_cases()))
def test_bad_arguments_raise_value_error_naming_them(function, changes, argument):
    gpu_tests.test_bad_arguments_raise_value_error_naming_them(function, changes, argument)


@pytest.mark.parametrize("function", sorted(gpu_tests.ARGUMENTS))
def test_cuda_failures_raise_runtime_error_with_the_cuda_message(function):
    gpu_tests.test_cuda_failures_raise_runtime_error_with_the_cuda_message(function)


# ---- the kernels ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", first_fast(DTYPES), ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("ignore_every", [0, 3], ids=["none-ignored", "some-ignored"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(dtype, trainable_head, ignore_every, shape):
    gpu_tests.test_matches_float64_reference(dtype, trainable_head, ignore_every, shape)


@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_all_rows_ignored(trainable_head):
    gpu_tests.test_all_rows_ignored(trainable_head)


@pytest.mark.parametrize("dtype", first_fast(DTYPES), ids=str)
@pytest.mark.parametrize("with_bias", first_fast([False, True]), ids=["no-bias", "bias"])
def test_many_slabs_match_one_slab(dtype, with_bias):
    gpu_tests.test_many_slabs_match_one_slab(dtype, with_bias)


@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
def test_masked_columns_whole_slabs_of_minus_infinity(dtype):
    gpu_tests.test_masked_columns_whole_slabs_of_minus_infinity(dtype)


@pytest.mark.slow
def test_compensated_hidden_gradient_rounds_about_once():
    gpu_tests.test_compensated_hidden_gradient_rounds_about_once()


def test_bias_gradient_sums_unrounded_logit_gradients():
    gpu_tests.test_bias_gradient_sums_unrounded_logit_gradients()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_head_takes_the_torch_backends_one_pass(dtype):
    gpu_tests.test_frozen_head_takes_the_torch_backends_one_pass(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows_take_the_element_load_path(dtype):
    gpu_tests.test_misaligned_rows_take_the_element_load_path(dtype)


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", first_fast(DTYPES), ids=str)
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_agrees_with_triton(dtype, trainable_head):
    """test_cuda_backend's test of the same name, on a shape the emulation runs quickly."""
    inputs = make_inputs(45, 72, 333, dtype, with_bias=trainable_head, ignore_every=5)
    logp_cuda, grads_cuda = run_and_compare("cuda", *inputs, trainable_head=trainable_head)
    logp_triton, grads_triton = run_and_compare("triton", *inputs, trainable_head=trainable_head)
    assert relative_error(logp_cuda, logp_triton) <= TOLERANCE[dtype]
    for ours, theirs in zip(grads_cuda, grads_triton):
        assert relative_error(ours, theirs) <= TOLERANCE[dtype]


# ---- logit transforms and per-token outputs -------------------------------------------------

# test_cuda_backend.OUTPUT_SHAPES but the largest: one column, then ten and seventeen blocks of
# rows (a partial last one) over slabs wider than a warp.
OUTPUT_SHAPES = gpu_tests.OUTPUT_SHAPES[:-1]


@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
@pytest.mark.parametrize("trainable_head", first_fast([True, False]), ids=["trainable", "frozen"])
@pytest.mark.parametrize("transform", gpu_tests.TRANSFORMS_AND_NONE.values(), ids=gpu_tests.TRANSFORMS_AND_NONE.keys())
@pytest.mark.parametrize("shape", OUTPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_transforms_and_outputs_match_float64(transform, dtype, trainable_head, shape):
    gpu_tests.test_transforms_and_outputs_match_float64(transform, dtype, trainable_head, shape)


@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
@pytest.mark.parametrize("trainable_head", first_fast([True, False]), ids=["trainable", "frozen"])
@pytest.mark.parametrize("outputs", first_fast(gpu_tests.EACH_OUTPUT), ids=lambda o: o[0])
def test_each_output_alone_over_many_slabs(outputs, dtype, trainable_head):
    gpu_tests.test_each_output_alone_over_many_slabs(outputs, dtype, trainable_head)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
def test_outputs_over_many_slabs_match_one_slab(dtype):
    gpu_tests.test_outputs_over_many_slabs_match_one_slab(dtype)


def test_soft_cap_bends_large_logits():
    gpu_tests.test_soft_cap_bends_large_logits()


def test_entropy_gradient_alone():
    gpu_tests.test_entropy_gradient_alone()


def test_entropy_used_as_a_metric_only():
    gpu_tests.test_entropy_used_as_a_metric_only()


def test_is_top1_takes_the_first_maximum():
    gpu_tests.test_is_top1_takes_the_first_maximum()


@pytest.mark.parametrize("dtype", first_fast([torch.float32, torch.bfloat16]), ids=str)
@pytest.mark.parametrize("transform", first_fast([{}, dict(logit_scale=1.7, temperature=1.3)]), ids=["none", "scale"])
def test_outputs_with_whole_slabs_of_minus_infinity(dtype, transform):
    gpu_tests.test_outputs_with_whole_slabs_of_minus_infinity(dtype, transform)


@pytest.mark.parametrize("dtype", first_fast(DTYPES), ids=str)
@pytest.mark.parametrize("group_rows", first_fast([1, 9, 10_000]), ids=["pair-groups", "groups-of-9", "one-group"])
@pytest.mark.parametrize("softcap", first_fast([None, 2.5]), ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("with_bias", first_fast([False, True]), ids=["no-bias", "bias"])
def test_gradients_in_forward_match_float64_logits(dtype, group_rows, softcap, with_bias):
    gpu_tests.test_gradients_in_forward_match_float64_logits(dtype, group_rows, softcap, with_bias)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", first_fast(DTYPES), ids=str)
@pytest.mark.parametrize("store_columns", [0, 8, 11, 40], ids=["one-column", "8-columns", "11-columns",
                                                                 "whole-vocabulary"])
@pytest.mark.parametrize("with_bias", first_fast([False, True]), ids=["no-bias", "bias"])
def test_gradients_in_forward_with_a_store_narrower_than_the_vocabulary(dtype, store_columns, with_bias):
    gpu_tests.test_gradients_in_forward_with_a_store_narrower_than_the_vocabulary(dtype, store_columns, with_bias)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_loss_head_bench_cuda_in_forward_method(loss_type):
    """`fastpref bench loss-head`'s GPU method fastpref-cuda-in-forward: the loss and gradients
    of the benchmark's own reference (TRL's math); its frozen-head row says why it has none."""
    from fastpref.bench import loss_head

    inputs = loss_head.make_inputs(3, 12, 16, 70, torch.float32, torch.device("cpu"), seed=2)
    inputs.weight.requires_grad_(True)
    reference = loss_head.loss_reference(inputs, loss_type)
    fn = loss_head.loss_function("fastpref-cuda-in-forward", loss_type, "trainable", torch.device("cpu"),
                                 torch.float32)
    loss = fn(inputs.hidden, inputs.weight, inputs.targets, loss_head.reference_logps_for(loss_type, inputs))
    loss.backward()
    assert relative_error(loss.detach(), reference.loss) < 1e-5
    assert relative_error(inputs.hidden.grad.reshape(reference.d_hidden.shape), reference.d_hidden) < 1e-5
    assert relative_error(inputs.weight.grad, reference.d_weight) < 1e-5
    frozen = loss_head.loss_function("fastpref-cuda-in-forward", loss_type, "frozen", torch.device("cpu"),
                                     torch.float32)
    assert isinstance(frozen, str) and "frozen head" in frozen
