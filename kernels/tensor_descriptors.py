"""Host side of the kernels that read and write through tensor descriptors (TMA on sm_90).

A descriptor made on the device (``tl.make_tensor_descriptor``) lives in a small global workspace
that Triton asks its allocator for at launch; the launch runs in a copied context whose allocator
gives it, so whatever allocator the caller set stays in place. TMA's layout rules: the last stride
1, the base address and every other stride a multiple of 16 bytes.
"""
import contextvars

import torch
import triton
import triton.language as tl

TMA_ALIGNMENT_BYTES = 16
# device-side descriptors and the allocator for their workspace, under these names from Triton 3.4
# (the package allows older releases: the backend then keeps the pointer-fed kernels)
AVAILABLE = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def descriptor_compatible(*tensors: torch.Tensor) -> bool:
    """Whether every tensor meets TMA's layout rules (a meta tensor's address counts as aligned)."""
    for tensor in tensors:
        if tensor.stride(-1) != 1 or tensor.data_ptr() % TMA_ALIGNMENT_BYTES:
            return False
        if any(stride * tensor.element_size() % TMA_ALIGNMENT_BYTES for stride in tensor.stride()[:-1]):
            return False
    return True


def aligned_row_length(columns: int, element_bytes: int) -> int:
    """The fewest elements >= columns whose bytes are a multiple of TMA's alignment: the row stride
    of a scratch that a descriptor writes."""
    multiple = max(1, TMA_ALIGNMENT_BYTES // element_bytes)
    return -(-columns // multiple) * multiple


def launch_with_descriptor_workspace(device: torch.device, launch) -> None:
    """launch() with the descriptors' workspace allocated on `device`."""
    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    def run():
        triton.set_allocator(allocate)
        launch()

    contextvars.copy_context().run(run)
