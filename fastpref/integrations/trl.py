"""TRL's ``DPOTrainer`` with the loss computed by fastpref from hidden states.

:class:`FastprefDPOTrainer` takes the arguments of ``trl.DPOTrainer`` and trains the same
objective; only the loss computation differs. Each step runs the model once, through whatever
wraps it (DDP, accelerate), with ``output_hidden_states=True`` and ``logits_to_keep=1``, so the
model builds logits for the last position only. The final hidden states of the positions that
predict completion tokens go with the LM-head weight to :class:`fastpref.PreferenceLoss`, which
computes the log-probs and the pair loss in one fused pass, forward and backward. No logits of the
completions are ever built.

Example (offline, a few seconds on a CPU)::

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig

    from fastpref.integrations.trl import FastprefDPOTrainer
    from fastpref.train.default_assets import default_tokenizer

    tokenizer = default_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    pairs = Dataset.from_dict({
        "prompt": ["What is the capital of France?", "Name a primary colour."] * 4,
        "chosen": [" Paris.", " Blue."] * 4,
        "rejected": [" London.", " Green."] * 4,
    })
    args = DPOConfig(output_dir="dpo-run", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                     beta=0.1, precompute_ref_log_probs=True, per_device_train_batch_size=2,
                     max_steps=4, bf16=False, report_to="none", save_strategy="no")
    trainer = FastprefDPOTrainer(model=model, args=args, train_dataset=pairs,
                                 processing_class=tokenizer)
    trainer.train()

Supported, with TRL 1.16's formulas (see :mod:`fastpref.loss_spec`):

- ``loss_type`` ``sigmoid``, ``hinge``, ``ipo`` (length-normalised, as in TRL), ``robust`` (with
  ``label_smoothing``), ``apo_zero``, ``apo_down``, ``sft``, and lists of them weighted by
  ``loss_weights`` (``["sigmoid", "sft"]`` is RPO); ``beta``.
- The reference: a ``ref_model``; for a PEFT model without one, the model with its adapter
  disabled (or its ``"ref"`` adapter), as TRL does; or ``precompute_ref_log_probs=True``. The
  precomputation goes through fastpref's op too, so precomputed and online reference log-probs
  come from the same computation as the policy's: no systematic offset between policy and
  reference (with the initial policy as reference, the first step's log-ratios are zero up to
  rounding).
- The MoE load-balancing loss (``router_aux_loss_coef``): the model's own ``aux_loss``.
- DDP through accelerate, gradient accumulation and checkpointing, mixed precision, LoRA.
- FSDP2 through accelerate (``fsdp=True`` with ``fsdp_config={"version": 2}``, the Trainer's
  default, or ``accelerate launch`` with FSDP version 2): the head weight is read after the
  model's forward, when FSDP2 holds the LM head's group gathered (accelerate's FSDP2 keeps the
  final norm and the LM head unsharded between forward and backward), so its gradient is
  reduce-scattered like every other; ``full_tensor()`` is never called.

Refused when the trainer is built, with a ``ValueError`` naming the option and its value:
``loss_type`` ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``,
``discopop``, ``sigmoid_norm``; ``f_divergence_type`` other than ``"reverse_kl"``;
``use_weighting=True``; ``ld_alpha``; ``sync_ref_model=True``; ``padding_free=True``; a nonzero
``label_smoothing`` unless ``loss_type`` has ``"robust"`` and no ``"sigmoid"`` (TRL 1.16 applies it
to ``robust`` only, fastpref to ``sigmoid`` as well); FSDP1 and DeepSpeed ZeRO-3 (the LM-head
weight is used outside the model's forward, where they hold it sharded); prompt-learning PEFT
(virtual tokens); vision-language models; models whose forward takes no ``logits_to_keep``; LM
heads that are not a plain ``torch.nn.Linear`` (adapters on ``lm_head``).

Soft-capped and scaled heads (Gemma-2's ``final_logit_softcapping``; Cohere's ``logit_scale``,
Granite's ``logits_scaling``, ``output_multiplier``, ``lm_head_multiplier``) are read off the
model's config as TRL's own fused head reads them (:mod:`fastpref.causal_lm`) and computed inside
the fused op.

Logged metrics: TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_tokens`` (and ``aux_loss`` for
MoE models), with TRL's values. ``entropy``, ``logits/chosen``, ``logits/rejected`` and
``mean_token_accuracy`` need each completion token's distribution over the whole vocabulary,
which is never built: they are not logged.

``compute_loss(..., return_outputs=True)`` (``evaluate`` with ``compute_metrics``) behaves as in
TRL: an extra no-grad forward builds the full logits for ``compute_metrics``.

Every scored sequence needs at least one completion token after the one-token shift (a completion
that starts at position 0 loses its first token); fastpref's layout refuses empty ones.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor
from accelerate.utils import is_peft_model, parse_flag_from_env
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from ..layout import pack_padded
from ..linear_logprobs import linear_logprobs
from ..losses import PreferenceLoss, sequence_logps
from ..causal_lm import CausalLMParts, causal_lm_parts
from .trl_head import add_fused_lm_head, use_fastpref_head

__all__ = ["FastprefDPOTrainer", "SUPPORTED_LOSS_TYPES", "add_fused_lm_head", "use_fastpref_head"]

# TRL loss types whose TRL formula fastpref computes (TRL's "ipo" is length-normalised, fastpref's
# default for "ipo").
SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down", "sft")
_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected")
# Batch entries that are not model inputs (TRL's `_non_model_keys`).
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def _fsdp_version(args: DPOConfig) -> Optional[int]:
    """The FSDP version the run will use (None: no FSDP): the Trainer's fsdp_config, whose default is
    FSDP2, or accelerate launch's FSDP_VERSION, whose default is FSDP1."""
    if args.fsdp:
        return int((args.fsdp_config or {}).get("version", 2))
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def _refuse_unsupported_config(args: DPOConfig) -> None:
    """Raise for every DPOConfig setting whose math the fused loss would not reproduce."""
    for name in args.loss_type:
        if name not in SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"loss_type={args.loss_type!r}: {name!r} is not supported by FastprefDPOTrainer "
                f"(supported: {', '.join(SUPPORTED_LOSS_TYPES)}); use trl.DPOTrainer for it")
    fsdp1 = _fsdp_version(args) == 1
    zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
    refusals = (
        ("f_divergence_type", args.f_divergence_type, args.f_divergence_type != "reverse_kl",
         "the fused losses use the plain log-ratios of the reverse KL; use 'reverse_kl'"),
        ("use_weighting", args.use_weighting, args.use_weighting,
         "WPO weights need sum_v p_v^2 over the vocabulary for every token, which is never built"),
        ("ld_alpha", args.ld_alpha, args.ld_alpha is not None,
         "LD-DPO's down-weighting of the tokens past the shorter completion is not implemented"),
        ("sync_ref_model", args.sync_ref_model, args.sync_ref_model,
         "TR-DPO's reference-model syncing is not supported"),
        ("padding_free", args.padding_free, args.padding_free,
         "the fused loss reads TRL's padded batch (TRL 1.16 itself falls back to padding)"),
        ("fsdp version", 1, fsdp1,
         "FSDP1 keeps the LM-head weight in a flat sharded buffer outside the model's forward, where the "
         "fused loss multiplies it; use FSDP2 (fsdp_config={'version': 2}, or FSDP_VERSION=2 with "
         "accelerate launch), DDP or DeepSpeed ZeRO-1/2"),
        ("deepspeed zero_stage", 3, zero3,
         "the fused loss multiplies the LM-head weight outside the model's forward, where ZeRO-3 "
         "holds it partitioned; use ZeRO-1/2 or DDP"),
    )
    for option, value, refused, why in refusals:
        if refused:
            raise ValueError(f"{option}={value!r} is not supported by FastprefDPOTrainer: {why}")
    if args.label_smoothing != 0.0 and "robust" not in args.loss_type:
        raise ValueError(
            f"label_smoothing={args.label_smoothing!r} with loss_type={args.loss_type!r}: of the "
            "supported types only 'robust' uses it; TRL 1.16 silently ignores it for 'sigmoid' (and "
            "the others), and so would this trainer. Set label_smoothing=0.0, or use 'robust'")
    if args.label_smoothing != 0.0 and "sigmoid" in args.loss_type:
        raise ValueError(
            f"label_smoothing={args.label_smoothing!r} with loss_type={args.loss_type!r}: TRL 1.16 "
            "applies it to 'robust' only and ignores it for 'sigmoid', while fastpref's 'sigmoid' "
            "applies it (conservative DPO). Drop 'sigmoid' or set label_smoothing=0.0")


def _refuse_prompt_learning(model, peft_config) -> None:
    config = peft_config
    if config is None and is_peft_model(model):
        config = model.active_peft_config
    if config is not None and config.is_prompt_learning:
        raise ValueError(
            f"peft_config={type(config).__name__}: prompt-learning PEFT is not supported by "
            "FastprefDPOTrainer: its virtual tokens shift the hidden states against the completion "
            "mask. Use an adapter on the weights (LoRA)")


def _refuse_vision(processing_class) -> None:
    if isinstance(processing_class, ProcessorMixin):
        raise ValueError(
            f"processing_class={type(processing_class).__name__}: vision-language models (a "
            "processor rather than a tokenizer) are not supported by FastprefDPOTrainer")


def _fastpref_loss_terms(loss_types: Sequence[str], loss_weights: Sequence[float]
                         ) -> Tuple[List[str], List[float]]:
    """TRL's weighted loss terms for :class:`fastpref.PreferenceLoss`.

    TRL logs rewards/* from the reference even when the loss is "sft" alone; fastpref's "sft"
    takes no reference, so a "sigmoid" term of weight 0 (nothing in the loss or its gradient)
    is added to make it ask for one.
    """
    types, weights = list(loss_types), [float(w) for w in loss_weights]
    if all(name == "sft" for name in types):
        types, weights = ["sigmoid"] + types, [0.0] + weights
    return types, weights


def _model_kwargs(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    kwargs = {key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    return kwargs


def _gathered_head(model) -> CausalLMParts:
    """The LM head of `model` just after its forward, checked to be whole: under FSDP2 its group
    must still be gathered then (a sharded weight here would need full_tensor(), whose gradient
    skips FSDP's reduce-scatter)."""
    parts = causal_lm_parts(model)
    if any(isinstance(p, DTensor) for p in (parts.head_weight, parts.head_bias) if p is not None):
        raise ValueError(
            "the LM head's weight is still sharded after the model's forward: FSDP2 resharded its group. "
            "Keep the LM head's group gathered after forward (fully_shard(..., reshard_after_forward=False) "
            "on a group holding lm_head, as accelerate's FSDP2 does, or leave lm_head in the root's group)")
    return parts


def _shifted_targets(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[2B, T - 1]: position t predicts input_ids[t + 1]; -100 outside the completions."""
    completion = inputs["completion_mask"][:, 1:]
    return inputs["input_ids"][:, 1:].masked_fill(completion == 0, -100)


class FastprefDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is fastpref's fused op on hidden states; same arguments.

    See the module documentation for what is supported, what is refused and which metrics are
    logged. ``self.fastpref_loss`` is the :class:`fastpref.PreferenceLoss` it uses.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None):
        if args is None:  # TRL's default, built here so that it is checked like a given one
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        # Settings are checked before TRL tokenizes the data or precomputes reference log-probs.
        _refuse_unsupported_config(args)
        _refuse_prompt_learning(model, peft_config)
        _refuse_vision(processing_class)
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        types, weights = _fastpref_loss_terms(args.loss_type, weights)
        # Set before TRL's __init__, which precomputes reference log-probs through it.
        self.fastpref_loss = PreferenceLoss(types, beta=args.beta, loss_weights=weights,
                                            label_smoothing=args.label_smoothing)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        self._refuse_unsupported_models()
        # the policy's soft cap and logit scale, read off its config as TRL's own head reads them
        transform = causal_lm_parts(self.accelerator.unwrap_model(self.model)).transform
        self.fastpref_loss = PreferenceLoss(types, beta=args.beta, loss_weights=weights,
                                            label_smoothing=args.label_smoothing, **asdict(transform))

    def _refuse_unsupported_models(self) -> None:
        _refuse_vision(self.processing_class)  # TRL loads one when none is given
        for role, model in (("model", self.model), ("ref_model", self.ref_model)):
            if model is None:
                continue
            model = self.accelerator.unwrap_model(model)
            causal_lm_parts(model)  # raises for LM heads that are not a plain Linear
            base = model.get_base_model() if is_peft_model(model) else model
            if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
                raise ValueError(
                    f"{role}={type(base).__name__}: its forward takes no logits_to_keep, so it would "
                    "build the full logits the fused loss exists to avoid; not supported")

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch, as (chosen [B], rejected [B]).

        Overrides TRL's so that the precomputed values (``precompute_ref_log_probs=True``) come
        from the same fused op as the online ones and the policy's.
        """
        return self._reference_logps(model, inputs).chunk(2)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precomputation, cached under a key of its own.

        TRL caches the values by dataset and reference weights; without a key of their own, a
        TRL run and a fastpref run on the same data would read each other's values.
        """
        trl_key = self._precompute_model_hash
        self._precompute_model_hash = f"{trl_key}-fastpref"
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = trl_key

    def _reference_logps(self, model, inputs) -> torch.Tensor:
        """[2B] summed completion log-probs under the reference, chosen rows first.

        The setting is TRL's: no grad, gradient checkpointing off, the PEFT model's "ref" adapter
        or none when there is no ref_model, the accelerator's mixed precision; the forward is the
        policy's (see :meth:`_compute_loss`).
        """
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), adapter, \
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with self.accelerator.autocast():
                outputs = model(**_model_kwargs(inputs), output_hidden_states=True, logits_to_keep=1)
            # read after the forward: under FSDP2 the head is then the gathered weight (see _compute_loss)
            parts = _gathered_head(self.accelerator.unwrap_model(model))
            packed = pack_padded(outputs.hidden_states[-1][:, :-1], _shifted_targets(inputs))
            weight = parts.head_weight
            token_logp = linear_logprobs(packed.hidden.to(weight.dtype), weight, packed.targets,
                                         bias=parts.head_bias, num_kept=packed.layout.num_response_tokens,
                                         backend=self.fastpref_loss.backend, **asdict(parts.transform))
            return sequence_logps(token_logp, packed.layout)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        if self.precompute_ref_logps:
            reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            reference = self._reference_logps(
                self.ref_model if self.ref_model is not None else self.model, inputs)

        model_kwargs = _model_kwargs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        # The wrapper's own forward keeps DDP's gradient synchronisation; logits_to_keep=1 makes the
        # model's LM head run on one position per row. hidden_states[-1] is the final, normed state.
        outputs = model(**model_kwargs, output_hidden_states=True, logits_to_keep=1)
        parts = _gathered_head(self.accelerator.unwrap_model(model))
        packed = pack_padded(outputs.hidden_states[-1][:, :-1], _shifted_targets(inputs))
        # Mixed precision may hand back float32 hidden states next to a half-precision head.
        weight = parts.head_weight
        loss, metrics = self.fastpref_loss(packed.hidden.to(weight.dtype), weight, packed.targets,
                                           packed.layout, reference, bias=parts.head_bias)

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._log_pair_metrics(mode, metrics, packed.layout.num_pairs, inputs)

        if return_outputs:
            warnings.warn(
                "return_outputs=True: the logits for compute_metrics are built by an extra forward "
                "over the full vocabulary, as in TRL", stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_pair_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], num_pairs: int,
                          inputs: Dict[str, torch.Tensor]) -> None:
        """TRL's metric keys with TRL's values: means over every pair of every process."""
        sums = torch.stack([metrics[key] for key in _PAIR_METRICS]) * num_pairs
        count = torch.full_like(sums[:1], num_pairs)
        total = self.accelerator.gather(torch.cat([sums, count])[None]).sum(0)
        for key, value in zip(_PAIR_METRICS, (total[:-1] / total[-1]).tolist()):
            self._metrics[mode][key].append(value)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
