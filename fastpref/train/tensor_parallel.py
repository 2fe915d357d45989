"""A vocabulary-parallel LM head (``--parallel tp``): the head sharded over all processes.

The LM head is sharded on the vocabulary with torch's ``parallelize_module(..., ColwiseParallel())``
over a 1-D mesh of every process: each holds V / K rows of W (and of b), its gradient and its
optimizer state, and the fused loss runs vocabulary-parallel (:mod:`fastpref.vocab_parallel`): one
all_gather of per-row statistics in the forward, one all_reduce of the hidden gradient in the
backward. The rest of the model is replicated: every process runs the same micro-batch through it
and gets the same gradient (the hidden gradient is summed over the mesh), so nothing else is
reduced. A run with K processes is one run with the global batch, the head's memory split K ways.
"""
from __future__ import annotations

import torch

from ..causal_lm import unwrap


def check_setup(parallel: str, world_size: int, lora_r: int) -> None:
    """Refuse, before any process group is joined, set-ups the sharded head cannot run."""
    if parallel != "tp":
        return
    if world_size <= 1:
        raise ValueError(
            "--parallel tp needs a process group of 2 or more processes (WORLD_SIZE is "
            f"{world_size}): launch with torchrun --nproc-per-node N, or leave --parallel at ddp for one process")
    if lora_r:
        raise ValueError(f"--parallel tp with --lora-r {lora_r}: LoRA over a sharded head's model is not "
                         "supported; use --parallel ddp or fsdp for LoRA")


def shard_head(model, device: torch.device, world_size: int):
    """Shard `model`'s LM head on the vocabulary over all processes, in place; returns `model`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    lm = unwrap(model)
    head, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    if embeddings is not None and head.weight is embeddings.weight:
        raise ValueError(f"--parallel tp: {type(lm).__name__}'s LM head is tied to its input embeddings, "
                         "which a vocabulary-sharded head cannot be; use --parallel fsdp")
    name = next(name for name, module in lm.named_modules() if module is head)
    mesh = init_device_mesh(device.type, (world_size,))
    parallelize_module(lm, mesh, {name: ColwiseParallel()})
    return model


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose head gradient is a DTensor and the others
    are not (torch's foreach kernels refuse the mix): the global 2-norm, the head's shards reduced
    over the mesh, and every gradient scaled by min(1, max_norm / (norm + 1e-6)) as torch does."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    squares = [g.float().square().sum() for g in grads]
    total = sum(s.full_tensor() if isinstance(s, DTensor) else s for s in squares).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale.to(grad.dtype))
    return total
