"""fastpref as TRL 1.16's fused LM head: every TRL trainer that scores tokens through
``add_fused_lm_head`` (``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``) can have
its log-probs computed by :func:`fastpref.linear_logprobs`.

TRL's trainers call ``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
outputs)`` in their ``__init__``; it patches ``model.forward`` so that ``model(..., labels=labels,
fused_lm_head=True)`` runs the backbone and returns a ``FusedCausalLMOutput`` of per-token values.
:func:`add_fused_lm_head` here has the same signature and returns the same class with the same
meaning; only the op differs. Per next-token position n with label t_n (``-100``: ignored),
hidden state h_n and the logit transform z = s(W h_n + b) read off the config (scale, soft cap,
see :mod:`fastpref.causal_lm`) and divided by ``temperature``:

    log_probs_n        = z_{n,t_n} - logsumexp_v z_{n,v}
    entropy_n          = logsumexp_v z_{n,v} - sum_v p_{n,v} z_{n,v}
    log_sum_sq_probs_n = log sum_v p_{n,v}^2
    mean_logits_n      = (1/V) sum_v z_{n,v}
    is_top1_n          = [t_n == argmax_v z_{n,v}]
    loss               = -sum_n log_probs_n / num_items_in_batch   (default: the count of labels)
                         + router_aux_loss_coef * aux_loss          (MoE, with router logits)

every per-token field 0 (False) where the label is -100. No [tokens x vocab] logits are built.

:func:`use_fastpref_head` makes the four trainers use it: they patch their model when they are
built, so it is construction that has to happen under it::

    with use_fastpref_head():
        trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    trainer.train()

FSDP2: the head weight is read after the backbone's forward, inside the model's forward, where
FSDP2 holds it gathered when the LM head sits in the root's group (``fully_shard`` on the layers,
then on the model) or in a group with the final norm that is kept gathered after forward (what
accelerate's FSDP2 does). Its gradient then goes through FSDP's reduce-scatter like every other.
A head still sharded there raises a ValueError naming the fix: gathering it with
``full_tensor()``, as TRL's own head does, would leave its gradient local to each process.

DeepSpeed ZeRO-3: the head weight is read inside a call of the LM-head module
(:func:`fastpref.causal_lm.call_through_head`), where ZeRO-3 gathers the partitioned weight, and
again for the backward; its gradient is reduced into the weight's partition like every other.
"""
from __future__ import annotations

import functools
import importlib
import types
from contextlib import nullcontext
from typing import Callable, Dict, Tuple

import torch
import transformers
from packaging.version import Version
from torch.distributed.tensor import DTensor
from trl.trainer.utils import FusedCausalLMOutput

from ..causal_lm import call_through_head, causal_lm_parts, logit_transform
from ..linear_logprobs import check_outputs, linear_logprobs

__all__ = ["FusedCausalLMOutput", "HeadSwap", "TRAINER_MODULES", "add_fused_lm_head", "head_inputs",
           "use_fastpref_head"]

# The TRL modules whose trainers call `add_fused_lm_head` by the name they imported.
TRAINER_MODULES = ("trl.trainer.dpo_trainer", "trl.trainer.kto_trainer", "trl.trainer.grpo_trainer",
                   "trl.trainer.rloo_trainer")


def _unsharded(parameter, name: str):
    """`parameter` as FSDP2 holds it during the forward; refused while it is a sharded DTensor."""
    if isinstance(parameter, DTensor):
        raise ValueError(
            f"the LM head's {name} is still a sharded DTensor after the backbone's forward: FSDP2 has not "
            "gathered the LM head's group. Leave lm_head in the root's group (fully_shard the decoder layers, "
            "then the model), or shard it with the final norm in a group kept gathered after forward "
            "(fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False), as accelerate's "
            "FSDP2 does); gathering it with full_tensor() would leave its gradient local to each process. "
            "A head sharded on the vocabulary by tensor parallelism (tp_plan) is not supported through TRL's "
            "trainers; fastpref.linear_logprobs and fastpref train --parallel tp take one")
    return parameter


def _load_balancing_loss(model, text_config, router_logits, attention_mask):
    """TRL 1.16's MoE load-balancing loss of the fused head (Mixtral's, which every MoE family
    shares), with the expert counts looked up where TRL looks them up."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    version = Version(transformers.__version__)
    if version < Version("5.0.0"):
        num_experts, num_experts_per_tok = model.num_experts, model.num_experts_per_tok
    else:
        # transformers 5.0 to 5.5 lack GptOssConfig.num_experts
        old_gpt_oss = text_config.model_type == "gpt_oss" and version < Version("5.6.0")
        num_experts = model.num_experts if old_gpt_oss else text_config.num_experts
        num_experts_per_tok = text_config.num_experts_per_tok
    # Padding-free packs every real token into one row without an attention mask: every token counts.
    return load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)


def head_inputs(hidden, weight, bias=None, cast_lm_head_to_fp32: bool = False):
    """(hidden, weight, bias) in the dtype fastpref's head computes in: float32 with
    `cast_lm_head_to_fp32`, else autocast's dtype where autocast is on (as a model's own head
    computes under it), else the hidden states'. One rule for every pass of a trainer (policy or
    reference, TRL's loss code or the fused pair loss), so that the same weights and inputs give
    the same log-probs in each."""
    device_type = weight.device.type
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: Tuple[str, ...] = ("log_probs",),
) -> None:
    """Patch `model.forward` as ``trl.trainer.utils.add_fused_lm_head`` does, with fastpref's op.

    ``model(..., labels=labels, fused_lm_head=True)`` then runs the backbone (``use_cache=False``)
    and returns a ``trl.trainer.utils.FusedCausalLMOutput`` (see the module docstring for the
    math): position t of the final hidden states scores ``labels[:, t + 1]``, or ``shift_labels[:,
    t]`` when pre-shifted labels are passed (context or sequence parallelism); ``loss`` is divided
    by ``num_items_in_batch`` when passed, by the number of labels otherwise (at least 1); an
    all-ignored micro-batch gives a loss of 0 that is still connected to the model, so
    ``backward()`` runs. Without ``fused_lm_head=True`` the original forward runs (generation is
    unchanged), and the patched forward keeps the model class's signature, which ``generate``
    validates its keyword arguments against.

    The backbone and the LM head are looked up at each call (FSDP and PEFT replace them after the
    patch); the head must be a plain ``torch.nn.Linear`` (a LoRA adapter on it is refused: its
    weight alone would score without the adapter). Hidden states move to the head's device
    (``device_map``). Under autocast the op computes in the autocast dtype, otherwise in the
    hidden states' dtype; ``cast_lm_head_to_fp32`` computes it in float32, outside autocast.

    Args:
        model: a ``transformers`` causal LM (before PEFT wraps it).
        temperature: the logits are divided by it (> 0).
        cast_lm_head_to_fp32: run the head in float32, outside autocast.
        outputs: the per-token fields computed, among ``"log_probs"`` (always), ``"entropy"``,
            ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"``; the others are None.

    Raises ValueError (TypeError for a wrong type) at once for a temperature or an output name the
    op cannot take; at the call, for a head that is not a plain Linear or that FSDP2 still holds
    sharded.
    """
    original_forward = model.forward
    text_config = model.config.get_text_config()
    transform = logit_transform(text_config, temperature)
    check_outputs(outputs)
    requested = tuple(outputs)
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)

        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the next-token targets, "
                             "-100 where a position is not scored")
        kwargs["use_cache"] = False
        # MoE models: request router logits when the config asks for them, as the model's own forward does
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        hidden_states = backbone_outputs.last_hidden_state
        if shift_labels is None:
            hidden_states, labels = hidden_states[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        causal_lm_parts(self)  # raises for an LM head that is not a plain Linear

        def per_token_fields(head, hidden_states, labels):
            # Inside a call of the head (DeepSpeed ZeRO-3 gathers it for it), after the backbone's
            # forward (FSDP2 has gathered the head's group by now, see the module docstring)
            weight = _unsharded(head.weight, "weight")
            bias = None if head.bias is None else _unsharded(head.bias, "bias")
            hidden_states, labels = hidden_states.to(weight.device), labels.to(weight.device)
            mask = labels != -100
            device_type = weight.device.type
            hidden_states, weight, bias = head_inputs(hidden_states, weight, bias, cast_lm_head_to_fp32)
            # Only the labelled rows are computed. Their count is read on the host, one synchronisation per
            # call, as TRL's own head does: the prompt rows it leaves out (often half the tokens or more)
            # cost far more head FLOPs than the wait for the backbone's queued work.
            num_kept = int(mask.sum())
            under_autocast = torch.is_autocast_enabled(device_type)
            with torch.autocast(device_type, enabled=False) if under_autocast else nullcontext():
                per_token = linear_logprobs(
                    hidden_states.reshape(-1, hidden_states.shape[-1]), weight, labels.reshape(-1), bias=bias,
                    ignore_index=-100,
                    logit_scale=transform.logit_scale, softcap=transform.softcap, temperature=transform.temperature,
                    outputs=requested, num_kept=num_kept, backend="auto")
            return mask, tuple(None if value is None else value.view(mask.shape)
                               for value in (per_token.log_probs, per_token.entropy, per_token.log_sum_sq_probs,
                                             per_token.mean_logits, per_token.is_top1))

        mask, (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) = call_through_head(
            self, per_token_fields, hidden_states, labels)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)

        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_outputs.router_logits,
                                            kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss

        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_fused_forward, model)


class HeadSwap:
    """The fused head TRL's trainer modules use, swapped for fastpref's until :meth:`restore`
    (or the end of a ``with`` block); returned by :func:`use_fastpref_head`."""

    def __init__(self, head: Callable):
        self._saved: Dict[types.ModuleType, Callable] = {}
        for name in TRAINER_MODULES:
            module = importlib.import_module(name)
            self._saved[module] = module.add_fused_lm_head
            module.add_fused_lm_head = head

    def restore(self) -> None:
        """Put back the heads the trainer modules had before; a second call does nothing."""
        for module, head in self._saved.items():
            module.add_fused_lm_head = head
        self._saved = {}

    def __enter__(self) -> "HeadSwap":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


def use_fastpref_head() -> HeadSwap:
    """Have TRL's ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer`` built from now
    on patch their models with fastpref's :func:`add_fused_lm_head` instead of TRL's.

    The trainers patch the policy (and the reference model) in ``__init__``, so a trainer built
    under it keeps fastpref's head for its whole life, also after :meth:`HeadSwap.restore`. Use it
    around construction (``with use_fastpref_head(): trainer = DPOTrainer(...)``) or call it once
    (``swap = use_fastpref_head()``; ``swap.restore()`` undoes it). Swaps nest: each restores what
    it found.
    """
    return HeadSwap(add_fused_lm_head)
