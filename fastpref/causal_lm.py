"""Hugging Face causal LMs as the fused head sees them: the LM head's weight and bias (through the
DDP, FSDP2 and PEFT wrappers), and the logit transform its config asks for.

The transform is read as TRL 1.16's fused head reads it (``trl.trainer.utils.add_fused_lm_head``):
the soft cap from ``final_logit_softcapping`` (Gemma-2); the scale from ``logit_scale`` (Cohere),
else ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling``
(Granite, MiniCPM3; HyperCLOVA X multiplies by it); a ``logit_scale`` of None means unscaled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .logit_transform import LogitTransform


@dataclass
class CausalLMParts:
    head_weight: torch.nn.Parameter  # [V, H]
    head_bias: Optional[torch.nn.Parameter]
    transform: LogitTransform


def unwrap(model):
    """The causal LM inside DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _class_under_fsdp(module) -> type:
    """The module's own class: FSDP2's fully_shard swaps it for a subclass FSDP<name>(FSDPModule,
    <class>) that changes no math."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def logit_transform(config, temperature: float = 1.0) -> LogitTransform:
    """The transform between W h + b and the logits of a model with this config (see the module
    docstring), divided by `temperature`."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and logits_scaling is not None:
        scale = logits_scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / logits_scaling
    return LogitTransform.build(1.0 if scale is None else scale,
                                getattr(text_config, "final_logit_softcapping", None), temperature)


def causal_lm_parts(model) -> CausalLMParts:
    """The LM head of a (possibly DDP-, FSDP2- or PEFT-wrapped) AutoModelForCausalLM, checked to be a
    plain W h + b, and its logit transform."""
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    if _class_under_fsdp(head) is not torch.nn.Linear:
        raise ValueError(
            f"the LM head must be a plain torch.nn.Linear, got {type(head).__name__} "
            "(adapters on the LM head are not supported: leave it out of the LoRA target modules)")
    return CausalLMParts(head.weight, head.bias, logit_transform(lm.config))
