"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): reading a tensor's value on the host
raises.

On a GPU each such read (.item(), .tolist(), bool(t), nonzero(), boolean-mask indexing, ...)
stalls the CPU until the device has caught up. On a CPU nothing stalls, so nothing would catch a
read that a GPU run then pays for: within `no_host_reads()`, every op that needs a tensor's value
on the host raises HostRead, also inside fastpref's custom ops (whose implementations run with
the check still on) and in their backward.
"""
import contextlib
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the modules, not the functions fastpref exports under the same names
op_module = importlib.import_module("fastpref.linear_logprobs")

aten = torch.ops.aten

# ops whose result depends on a value read on the host (or whose output size does)
READS_VALUES = {
    aten._local_scalar_dense.default,  # .item(), bool(), int(), float()
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.equal.default,
    aten.allclose.default,
}

# fastpref's custom ops run their Python implementation with the check on
CUSTOM_OPS = {
    torch.ops.fastpref.linear_logprobs.default: op_module._forward_impl,
    torch.ops.fastpref.linear_logprobs_backward.default: op_module._backward_impl,
}


class HostRead(RuntimeError):
    pass


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS_VALUES:
            raise HostRead(f"{func} reads a tensor's value on the host")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _boolean_index(args):
            raise HostRead(f"{func} with a boolean mask sizes its result from the mask's values")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostRead("repeat_interleave without output_size reads the repeats on the host")
        if func in CUSTOM_OPS:
            # a mode's handler runs with Python dispatch switched off: switch it back on, or the
            # implementation's own ops would go unseen
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Python) | torch._C.DispatchKeySet(
                torch._C.DispatchKey.PythonTLSSnapshot)
            include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
            with torch._C._ForceDispatchKeyGuard(include, exclude - keys), self:
                return CUSTOM_OPS[func](*args, **kwargs)
        return func(*args, **kwargs)


def _tolist(self):
    raise HostRead("Tensor.tolist reads a tensor's values on the host")


@contextlib.contextmanager
def no_host_reads():
    original = torch.Tensor.tolist
    torch.Tensor.tolist = _tolist
    try:
        with _NoHostReads():
            yield
    finally:
        torch.Tensor.tolist = original
