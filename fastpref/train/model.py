"""Hugging Face causal LMs as fastpref sees them: hidden states from one packed forward, and an
LM-head weight the fused loss multiplies itself. The model's own lm_head never runs on training
tokens (but for one row, the last position's logits, which transformers always returns).
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

from ..causal_lm import causal_lm_parts, unwrap
from .packing import PackedPairs, dense_attention_mask, flex_block_mask


def packed_hidden(model, packed: PackedPairs, attention: str) -> torch.Tensor:
    """Hidden states [N, H] of the positions that predict response tokens, in one forward.

    The call goes through `model` itself (a DDP wrapper included, which keeps gradient
    synchronisation intact) with logits kept for the last position only, a [1, V] row; the
    final hidden states are the last entry of its hidden-state outputs.
    """
    if attention == "flex_attention":
        mask = flex_block_mask(packed)
    elif attention in ("sdpa", "eager"):
        mask = dense_attention_mask(packed, next(model.parameters()).dtype)
    elif attention.startswith("flash_attention"):
        if packed.prefix_sharing:
            raise ValueError("prefix sharing needs attention 'flex_attention' or 'sdpa', not flash attention")
        mask = None  # flash attention reads the segments off the restarting position ids
    else:
        raise ValueError(f"unsupported attention implementation {attention!r}")
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask,
                use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1][0].index_select(0, packed.loss_positions)


class FusedHeadForward(torch.nn.Module):
    """A causal LM whose forward ends in the fused loss: ``head(hidden, W, b)``.

    ``forward(packed, attention, head)`` computes the packed hidden states of the response
    positions (see :func:`packed_hidden`) and hands them, with the LM head's weight W and bias b,
    to ``head`` — a closure holding everything else the loss needs — and returns its result.
    The head weight is read inside this module's forward on purpose: wrapped by DDP or FSDP2 as
    the root module, the weight is then the whole, gathered one (FSDP2 unshards the root's group
    for its forward, and its post-backward reduce-scatters the head gradient like any other).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, packed: PackedPairs, attention: str, head):
        hidden = packed_hidden(self.model, packed, attention)
        parts = causal_lm_parts(self.model)
        return head(hidden, parts.head_weight, parts.head_bias)


def model_fingerprint(model) -> str:
    """A cheap identity of the weights: config plus a strided sample of every parameter."""
    digest = hashlib.sha256()
    lm = unwrap(model)
    digest.update(lm.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(lm.state_dict().items()):
        if "lora_" in name:  # adapters are the policy's, not the reference's
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def adapters_disabled(model):
    """Context in which a PEFT model is its frozen base (the reference); a no-op otherwise."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()
