"""Hugging Face causal LMs as the fused head sees them: the LM head's weight and bias (through the
DDP, FSDP2, DeepSpeed and PEFT wrappers), the logit transform its config asks for, and the call
through the LM-head module in which the fused head reads them (:func:`call_through_head`).

The transform is read as TRL 1.16's fused head reads it (``trl.trainer.utils.add_fused_lm_head``):
the soft cap from ``final_logit_softcapping`` (Gemma-2); the scale from ``logit_scale`` (Cohere),
else ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling``
(Granite, MiniCPM3; HyperCLOVA X multiplies by it); a ``logit_scale`` of None means unscaled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

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


def decoder_layer_modules(model) -> List[torch.nn.Module]:
    """The modules of the classes a causal LM lists in ``_no_split_modules`` (transformers' name for
    its decoder-layer classes), outermost first; empty for a model that lists none."""
    lm = unwrap(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    return [module for module in lm.modules() if type(module).__name__ in names]


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


def call_through_head(model, compute: Callable[..., Any], *inputs) -> Any:
    """``compute(head, *inputs)``, where ``head`` is `model`'s LM-head module; under DeepSpeed
    ZeRO-3, run as a call of ``head``.

    The fused head multiplies the head's weight itself rather than calling the head. ZeRO-3 keeps
    a weight partitioned (empty) outside the calls of its module: run as a call of the head, the
    fused head's use is seen by its hooks, which gather the weight before the call (whole inside
    `compute`), partition it again after, gather it again before the backward of the tensors
    `compute` returns (reached through tuples, lists and dicts), and reduce its gradient into the
    weight's partition as for the model's own head. `inputs` are passed positionally, as a module
    call's inputs: ZeRO-3 partitions the weight again after the backward once every input that
    requires grad has its gradient.

    Elsewhere `compute` is called directly: the weight is whole (DDP, one process), or gathered by
    the model's forward (FSDP2, whose hooks a second call of a module in a group would run again
    outside the group's order).
    """
    head = unwrap(model).get_output_embeddings()
    if not hasattr(head.weight, "ds_id"):  # not a ZeRO-3 parameter
        return compute(head, *inputs)
    own_forward = vars(head).get("forward")  # an instance's own forward (a patch) is put back after
    head.forward = lambda *args: compute(head, *args)
    try:
        return head(*inputs)
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
