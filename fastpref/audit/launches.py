"""Every Triton launch fastpref can make on a GPU, found by running the real launchers.

The Triton backend's entry points (forward, backward) are called with the GPU
tile table of an architecture, on meta tensors (shapes and dtypes, no memory), while
``JITFunction.run`` is replaced by a recorder: the launchers pick their grids, block sizes and
constexprs exactly as on a GPU, and nothing runs. Kernels are discovered, not listed: any
``@triton.jit`` function of ``fastpref.kernels`` that its module launches (``name[grid](...)``)
must turn up among the recorded launches, or the audit reports it as uncovered.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import pkgutil
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .arches import Arch

# (N scored tokens, H, V): the headline head shape (every size a multiple of 16, as Triton's
# divisibility specialisation sees a real model) and an odd one (Triton specialises on
# alignment, so unaligned rows compile to other code).
SHAPES = {"aligned": (16384, 4096, 128256), "odd": (1003, 4000, 50257)}
UNALIGNED_WIDTH_SHAPE = (1003, 4001, 50257)


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)`` and the configuration that made it."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: Tuple
    kwargs: Dict
    scenario: str


def _jit_function_type():
    from triton.runtime.jit import JITFunction

    return JITFunction


@contextlib.contextmanager
def recording_launches(sink: List[Launch], scenario: str) -> Iterator[None]:
    """Within the block, kernel launches are appended to `sink` instead of running."""
    jit_function = _jit_function_type()
    original = jit_function.run

    def record(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, dict(kwargs), scenario))
        return None

    jit_function.run = record
    try:
        yield
    finally:
        jit_function.run = original


def kernel_modules() -> List[str]:
    """Names of every module of fastpref.kernels."""
    from .. import kernels

    return sorted(f"{kernels.__name__}.{info.name}" for info in pkgutil.iter_modules(kernels.__path__))


def discover_kernels() -> Dict[str, object]:
    """{"module.name": JITFunction} of every launched @triton.jit function in fastpref.kernels.

    A jit function that its module launches with ``name[...]`` is a kernel; one only called from
    other jit functions is a device function, compiled as part of the kernels that call it.
    """
    jit_function = _jit_function_type()
    if not _is_compiling(jit_function):
        raise RuntimeError("TRITON_INTERPRET=1 is set: the compile audit needs Triton's GPU compiler "
                           "(run it in a process without TRITON_INTERPRET)")
    found = {}
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        for name, value in vars(module).items():
            if (isinstance(value, jit_function) and value.fn.__module__ == module_name
                    and re.search(rf"\b{re.escape(name)}\s*\[", source)):
                found[f"{module_name}.{name}"] = value
    return found


def _is_compiling(jit_function) -> bool:
    from .. import kernels  # noqa: F401 - imported for its side effect of loading triton's jit
    from ..kernels import logits_tile

    return isinstance(logits_tile.logits_tile, jit_function)


def kernel_key(kernel) -> str:
    return f"{kernel.fn.__module__}.{kernel.fn.__name__}"


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _op_scenarios(backend, arch: Arch) -> Iterator[Tuple[str, callable]]:
    """The fused linear log-prob op: forward and backward at every dtype, bias, gradient set and
    shape, with the identity transform and no extra outputs; then every kernel variant the logit
    transform and the per-token outputs switch on (soft cap, each output's sums alone and all of
    them, the entropy's gradient), at every dtype on the aligned shape. Targets are int64 (the
    public op converts them before any backend sees them). A frozen head whose hidden gradient is
    folded in is a slab pass of cuBLAS matmuls and its backward a scale: no Triton launch to
    compile there."""
    from ..backends import EXTRA_OUTPUTS, ForwardResult, HeadOptions
    from ..backends.triton_backend import kernel_config
    from ..logit_transform import LogitTransform

    plain = HeadOptions()
    for dtype, (shape_name, (rows, width, vocab)), has_bias in itertools.product(
            backend.BACKEND.dtypes, SHAPES.items(), (False, True)):
        config = kernel_config(dtype, arch.capability, arch.multiprocessors)
        hidden, weight = _meta((rows, width), dtype), _meta((vocab, width), dtype).requires_grad_()
        bias = _meta((vocab,), dtype) if has_bias else None
        targets = _meta((rows,), torch.int64)
        label = (f"{str(dtype).replace('torch.', '')} {shape_name} N={rows} H={width} V={vocab}"
                 f"{' bias' if has_bias else ''}")
        yield (f"forward {label} trainable head",
               lambda: backend.forward(hidden, weight, bias, targets, plain, False, config=config))
        saved = ForwardResult(*(_meta((rows,), torch.float32) for _ in range(3)))
        grad = _meta((rows,), torch.float32)
        for need_hidden, need_weight, need_bias in itertools.product((True, False), repeat=3):
            if not (need_hidden or need_weight or need_bias) or (need_bias and not has_bias):
                continue
            wanted = "+".join(name for name, need in (("hidden", need_hidden), ("weight", need_weight),
                                                      ("bias", need_bias)) if need)
            yield (f"backward {label} grads={wanted}",
                   lambda nh=need_hidden, nw=need_weight, nb=need_bias: backend.backward(
                       hidden, weight, bias, targets, saved, grad, None, plain, nh, nw, nb, config=config))

    # rows of a width that TMA cannot read (H * 2 bytes not a multiple of 16): the half-precision
    # launches of an arch whose table picks the persistent, TMA-fed kernels fall back to the others
    rows, width, vocab = UNALIGNED_WIDTH_SHAPE
    for dtype in (torch.bfloat16, torch.float16):
        config = kernel_config(dtype, arch.capability, arch.multiprocessors)
        if not config.persistent_programs:
            continue
        hidden, weight = _meta((rows, width), dtype), _meta((vocab, width), dtype).requires_grad_()
        targets = _meta((rows,), torch.int64)
        label = f"{str(dtype).replace('torch.', '')} N={rows} H={width} V={vocab} (rows not TMA-aligned)"
        yield (f"forward {label}", lambda: backend.forward(hidden, weight, None, targets, plain, False, config=config))
        saved = ForwardResult(*(_meta((rows,), torch.float32) for _ in range(3)))
        grad = _meta((rows,), torch.float32)
        yield (f"backward {label} grads=hidden+weight",
               lambda: backend.backward(hidden, weight, None, targets, saved, grad, None, plain, True, True, False,
                                        config=config))

    rows, width, vocab = SHAPES["aligned"]
    capped = LogitTransform(logit_scale=0.5, softcap=30.0, temperature=0.7)
    output_sets = [()] + [(name,) for name in EXTRA_OUTPUTS] + [EXTRA_OUTPUTS]
    for dtype, transform in itertools.product(backend.BACKEND.dtypes, (LogitTransform(), capped)):
        config = kernel_config(dtype, arch.capability, arch.multiprocessors)
        hidden, weight = _meta((rows, width), dtype), _meta((vocab, width), dtype).requires_grad_()
        targets = _meta((rows,), torch.int64)
        label = f"{str(dtype).replace('torch.', '')} aligned {'soft cap' if transform.softcap else 'no cap'}"
        for outputs in output_sets:
            if not (outputs or transform.softcap):
                continue  # the plain launch, above
            options = HeadOptions(transform, frozenset(outputs))
            yield (f"forward {label} outputs={'+'.join(outputs) or 'none'}",
                   lambda o=options: backend.forward(hidden, weight, None, targets, o, False, config=config))
        saved = ForwardResult(*(_meta((rows,), torch.float32) for _ in range(3)), entropy=_meta((rows,), torch.float32))
        grad = _meta((rows,), torch.float32)
        for grad_entropy in (None, grad):
            if grad_entropy is None and not transform.softcap:
                continue
            options = HeadOptions(transform, frozenset({"entropy"}))
            yield (f"backward {label} grads=hidden+weight{' entropy' if grad_entropy is not None else ''}",
                   lambda g=grad_entropy, o=options: backend.backward(
                       hidden, weight, None, targets, saved, grad, g, o, True, True, False, config=config))


def record_launches(arch: Arch) -> List[Launch]:
    """Every launch the Triton backend makes with `arch`'s tile table, in scenario order."""
    from ..backends import triton_backend

    launches: List[Launch] = []
    for scenario, run in _op_scenarios(triton_backend, arch):
        with recording_launches(launches, scenario):
            run()
    return launches


def uncovered_kernels(discovered: Dict[str, object], launches: List[Launch]) -> List[str]:
    """Kernels that exist but that no recorded configuration launches."""
    launched = {kernel_key(launch.kernel) for launch in launches}
    return sorted(set(discovered) - launched)


def first_tensor_dtype(args) -> Optional[str]:
    """The dtype of a launch's first floating-point tensor argument (its compute dtype)."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            return str(arg.dtype).replace("torch.", "")
    return None
