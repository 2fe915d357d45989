"""Fully sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Layout: every decoder layer is an FSDP group of its own; the root group, a
:class:`~fastpref.train.model.FusedHeadForward` around the model, holds the rest: the input
embeddings, the final norm and the LM head (a tied head and embedding are one parameter, in one
group). Each process keeps 1/world of every parameter, gradient and optimizer state; a group's
parameters are gathered for its forward (and again for its backward) and freed afterwards, and its
gradients are reduce-scattered (averaged over processes) as soon as they are complete.

The fused loss multiplies the LM-head weight W itself, outside the head module's forward. FSDP2
holds W gathered only while the group that owns it runs, so the loss runs inside the root's
forward (``FusedHeadForward.forward``): there W is the whole weight, and dL/dW reaches the root's
reduce-scatter like every other gradient. (``W.full_tensor()`` also yields a whole weight, but
autograd through it leaves each process with the head gradient of its own pairs only.)

Mixed precision: with ``--dtype bfloat16`` (or float16) the parameters stay float32, sharded — the
optimizer's master copy —; forward and backward compute in the low precision, and gradients are
reduced in float32.
"""
from __future__ import annotations

from typing import List

import torch

from ..causal_lm import decoder_layer_modules, unwrap
from .model import FusedHeadForward


def check_setup(parallel: str, world_size: int, pairs_per_step: int) -> None:
    """Refuse, before any process group is joined, set-ups FSDP2 cannot run."""
    if parallel != "fsdp":
        return
    if world_size <= 1:
        raise ValueError(
            "--parallel fsdp needs a process group of 2 or more processes (WORLD_SIZE is "
            f"{world_size}): launch with torchrun --nproc-per-node N (or accelerate launch), or use "
            "--parallel ddp for one process")
    if pairs_per_step % world_size:
        raise ValueError(
            f"--pairs-per-step {pairs_per_step} is not a multiple of the world size {world_size}: under "
            "--parallel fsdp every process runs every forward, so each must get the same number of pairs")


def decoder_layers(model) -> List[torch.nn.Module]:
    """The modules sharded one by one: those of the classes the model lists in ``_no_split_modules``
    (transformers' name for its decoder-layer classes), innermost first."""
    lm = unwrap(model)
    layers = decoder_layer_modules(lm)
    if not layers:
        raise ValueError(
            f"--parallel fsdp: {type(lm).__name__} names no decoder-layer class (_no_split_modules) to "
            "shard by; this model is not supported under FSDP2, use --parallel ddp")
    head, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    for layer in layers:
        if any(module is head or module is embeddings for module in layer.modules()):
            raise ValueError(
                f"--parallel fsdp: {type(lm).__name__}'s {type(layer).__name__} holds the LM head or the "
                "input embeddings, which must stay in the root group; this model is not supported under FSDP2")
    return layers[::-1]


def shard(head_model: FusedHeadForward, device: torch.device, world_size: int,
          compute_dtype: torch.dtype) -> FusedHeadForward:
    """Shard `head_model` in place over all processes (see the module documentation); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    precision = MixedPrecisionPolicy()
    if compute_dtype != torch.float32:
        # no casting of the inputs: they are token ids and the loss's closure (whose reference
        # log-probs stay float32), and FSDP cannot rebuild the packed batch's dataclasses
        precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
    for layer in decoder_layers(head_model.model):
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    # The root reshards after every forward too (FSDP2's default keeps it gathered until the
    # backward): after a no-grad forward (evaluation, the reference) the module would otherwise
    # still hold the gathered tensors, not the shards the optimizer and checkpoints work on. Its
    # pre-backward hook gathers the weights again before the fused loss's backward reads them.
    return fully_shard(head_model, mesh=mesh, mp_policy=precision, reshard_after_forward=True)
