"""TRL's ``DPOTrainer`` on fastpref's fused op; TRL's fused LM head computed by fastpref.

:class:`FastprefDPOTrainer` takes the arguments of ``trl.DPOTrainer`` 1.16 (its signature, bound
from TRL's own: a model as a hub id or a folder, ``processing_class=None``, ``peft_config``...) and
trains the same objective, with the same loss, gradients and metrics, for every setting
``trl.DPOTrainer`` runs (and ``padding_free=True``, which it does not); only the computation
differs. NaN and inf (a float16 overflow) reach the loss and the gradients as in TRL, so that a
GradScaler skips the step; the fused pair loss counts them in one metric of its own,
``non_finite_logps``.
:func:`add_fused_lm_head` and :func:`use_fastpref_head` (from :mod:`fastpref.integrations.trl_head`)
put fastpref's op under TRL's own ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer`` and
``RLOOTrainer``.

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

Every loss type and option of ``DPOConfig`` is a row of fastpref's table
(:mod:`fastpref.loss_types`, TRL's formulas): the model runs once with
``output_hidden_states=True, logits_to_keep=1``; the final hidden states of the completion
positions go with the LM-head weight to :class:`fastpref.PreferenceLoss`
(:func:`preference_loss_of`), which computes the log-probs, the loss and TRL's token metrics
(``entropy``, ``logits/*``, ``mean_token_accuracy``) in one pass over the vocabulary, without the
[tokens x vocab] logits. A model whose forward takes no ``logits_to_keep`` is left to TRL's own
loss code (``trainer.uses_fused_loss`` is False), on fastpref's head: TRL's trainer is built
under :func:`use_fastpref_head`, so the ``fused_lm_head=True`` forward that code calls is
fastpref's :func:`add_fused_lm_head`.

The reference log-probs, precomputed (``precompute_ref_log_probs=True``) or online, are computed
as the policy's: by the same forward, head dtype, op call and sums, ``ld_alpha``'s weighting
included (:meth:`FastprefDPOTrainer.compute_ref_log_probs`). A policy equal to
its reference therefore has rewards exactly 0, in bfloat16 too, and precomputed and online values
are the same computation. The reference is a ``ref_model`` (a module, a hub id or a folder);
for a PEFT model without one, the model with its adapter disabled (or its ``"ref"`` adapter), as
TRL does; ``sync_ref_model=True`` (TR-DPO) runs TRL's ``SyncRefModelCallback`` on the
``ref_model``. Also: the MoE load-balancing loss (``router_aux_loss_coef``), DDP through
accelerate, gradient accumulation and checkpointing, mixed precision, LoRA, and FSDP2 through
accelerate (``fsdp=True`` with ``fsdp_config={"version": 2}``, or ``accelerate launch`` with FSDP
version 2): the head weight is read after the model's forward (fused pair loss) or inside it
(fastpref's head), where FSDP2 holds the LM head's group gathered, so its gradient is
reduce-scattered like every other; ``full_tensor()`` is never called. DeepSpeed ZeRO-1/2/3
through accelerate (``deepspeed=`` a config, or ``accelerate launch`` with a DeepSpeed config):
under ZeRO-3 the fused head reads the weight inside a call of the LM-head module
(:func:`fastpref.causal_lm.call_through_head`), so ZeRO-3 gathers the partitioned weight for it,
releases it after, gathers it again for its backward and reduces its gradient into the partition;
the reference model, a DeepSpeed engine of its own, is read the same way. Soft-capped and scaled heads
(Gemma-2's ``final_logit_softcapping``; Cohere's ``logit_scale``, Granite's ``logits_scaling``,
``output_multiplier``, ``lm_head_multiplier``) are read off the model's config as TRL's own head
reads them (:mod:`fastpref.causal_lm`) and computed inside the op.

``padding_free=True``, which TRL 1.16 turns off with a warning, is honoured on the fused pair
loss: :class:`PaddingFreeCollator` packs TRL's padded batch on the CPU (every chosen and rejected
row back to back in one row, no padding, position ids restarting per sequence, see
:func:`fastpref.train.packing.pack_rows`) and the step is one packed forward with block-diagonal
causal attention (flash-attention's varlen path, read off the position ids, under
``attn_implementation="flash_attention_2"``; a dense block-diagonal mask under sdpa or eager; a
BlockMask under flex), the reference log-probs through the same packed forward. It gives TRL's
padded step up to float32 rounding.

Refused when the trainer is built, with a ``ValueError`` naming the setting: ``padding_free=True``
with a model whose forward takes no ``logits_to_keep`` or with the MoE load-balancing loss (the
packed forward does not compute it); WPO with AOT (as TRL refuses it); FSDP1 (it holds the LM-head
weight in a flat sharded buffer outside the model's forward, where the fused pair loss uses it);
prompt-learning PEFT (virtual tokens);
tensor-parallel models (``tp_plan``, ``model.tp_size``, ``parallelism_config.tp_size``);
vision-language models; LM heads that are not a plain ``torch.nn.Linear`` (adapters on
``lm_head``). TRL's own refusals (``sync_ref_model`` with PEFT or with precomputed reference
log-probs) stand.

Logged metrics: TRL's keys with TRL's values (``rewards/*``, ``logps/*``, ``entropy``,
``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``, ``num_tokens``, and ``aux_loss``
for MoE models). ``compute_loss(..., return_outputs=True)`` (``evaluate`` with
``compute_metrics``) behaves as in TRL: an extra no-grad forward builds the full logits for
``compute_metrics`` (refused with ``padding_free=True``, whose batch has no padded logits).

Every scored sequence needs at least one completion token after the one-token shift (a completion
that starts at position 0 loses its first token); fastpref's layout refuses empty ones.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.distributed.tensor import DTensor
from accelerate.utils import is_peft_model, parse_flag_from_env
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from ..causal_lm import call_through_head, causal_lm_parts, unwrap
from ..layout import PackedLayout, pack_padded
from .. import loss_types
from ..losses import PreferenceLoss
from ..train.model import packed_hidden
from ..train.packing import PackedPairs, pack_rows
from .trl_head import add_fused_lm_head, head_inputs, use_fastpref_head

__all__ = ["FastprefDPOTrainer", "PaddingFreeCollator", "add_fused_lm_head", "preference_loss_of",
           "use_fastpref_head"]

# Means over the pairs. non_finite_logps is fastpref's own: the share of sequences whose policy or
# reference log-prob is NaN or inf, which go through to the loss as in TRL (a GradScaler skips the step).
_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "non_finite_logps")
# TRL's token metrics, each a mean over the tokens of: all completions, the chosen ones, the rejected ones
_TOKEN_METRICS = (("entropy", "all"), ("logits/chosen", "chosen"), ("mean_token_accuracy", "chosen"),
                  ("logits/rejected", "rejected"))
# The constructor's arguments: trl.DPOTrainer's, whatever the installed TRL's are.
_DPO_TRAINER_SIGNATURE = inspect.signature(DPOTrainer.__init__)
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
    """Raise for every setting the trainer cannot run as TRL's objective."""
    fsdp1 = _fsdp_version(args) == 1
    refusals = (
        ("fsdp version", 1, fsdp1,
         "FSDP1 keeps the LM-head weight in a flat sharded buffer outside the model's forward, where the "
         "fused loss multiplies it; use FSDP2 (fsdp_config={'version': 2}, or FSDP_VERSION=2 with "
         "accelerate launch), DDP or DeepSpeed ZeRO-1/2/3"),
    )
    for option, value, refused, why in refusals:
        if refused:
            raise ValueError(f"{option}={value!r} is not supported by FastprefDPOTrainer: {why}")


def _refuse_prompt_learning(model, peft_config) -> None:
    config = peft_config
    if config is None and not isinstance(model, str) and is_peft_model(model):
        config = model.active_peft_config
    if config is not None and config.is_prompt_learning:
        raise ValueError(
            f"peft_config={type(config).__name__}: prompt-learning PEFT is not supported by "
            "FastprefDPOTrainer: its virtual tokens shift the hidden states against the completion "
            "mask. Use an adapter on the weights (LoRA)")


def _refuse_tensor_parallel(model, args: DPOConfig) -> None:
    """A model sharded by transformers' tp_plan (or accelerate's tp_size) is refused: the trainer's
    batches, reference and checkpoints are not set up for it, and no step of it has been checked
    against one process: accelerate's ParallelismConfig refuses processes without a GPU
    (DistributedType.MULTI_CPU), so a Trainer on such a model does not run on gloo. The op and
    PreferenceLoss do take its vocabulary-sharded head; ``fastpref train --parallel tp`` trains one."""
    init_kwargs = getattr(args, "model_init_kwargs", None) or {}
    parallelism = getattr(args, "parallelism_config", None)
    settings = (("tp_plan", init_kwargs.get("tp_plan") if isinstance(model, str) else None),
                ("model.tp_size", None if isinstance(model, str) else getattr(model, "tp_size", None)),
                ("parallelism_config.tp_size", getattr(parallelism, "tp_size", None)))
    for name, value in settings:
        if value not in (None, 1):
            raise ValueError(
                f"{name}={value!r}: tensor-parallel models are not supported by FastprefDPOTrainer; "
                "fastpref.linear_logprobs and fastpref.PreferenceLoss take a vocabulary-sharded LM head, "
                "and `fastpref train --parallel tp` trains one (accelerate runs a Trainer's tensor parallelism "
                "on GPU processes only, where this trainer has not been checked)")


def _reference_from_path(path: str, args: DPOConfig, quantization_config):
    """`ref_model` given as a hub id or a local folder, loaded as TRL loads `model` from one: with
    `args.model_init_kwargs` and `quantization_config` (TRL 1.16 takes only a loaded reference)."""
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # as TRL: "auto" fails in distributed training
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(path, **init_kwargs)


def _refuse_vision(processing_class) -> None:
    if isinstance(processing_class, ProcessorMixin):
        raise ValueError(
            f"processing_class={type(processing_class).__name__}: vision-language models (a "
            "processor rather than a tokenizer) are not supported by FastprefDPOTrainer")


def preference_loss_of(args: DPOConfig, transform) -> PreferenceLoss:
    """TRL's loss settings of `args` as a :class:`fastpref.PreferenceLoss` (every one of DPOConfig's
    loss types is a row of fastpref.loss_types), with TRL's token metrics.

    A hyper-parameter none of the loss types reads is left out, as TRL ignores it (its "sigmoid"
    takes no label_smoothing, for one). TRL logs rewards/* from the reference even when the loss
    is "sft" alone; fastpref's "sft" takes no reference, so a "sigmoid" term of weight 0 (nothing
    in the loss or its gradient) is added to make it ask for one.
    """
    types = list(args.loss_type)
    weights = [float(w) for w in (args.loss_weights or [1.0] * len(types))]
    if all(name == "sft" for name in types):
        types, weights = ["sigmoid"] + types, [0.0] + weights
    read = loss_types.reads_of(types)
    options = {name: getattr(args, name) for name in ("label_smoothing", "discopop_tau", "f_divergence_type",
                                                      "f_alpha_divergence_coef") if name in read}
    return PreferenceLoss(types, loss_weights=weights, beta=args.beta, use_weighting=args.use_weighting,
                          ld_alpha=args.ld_alpha, token_metrics=True, **options, **asdict(transform))


def _model_kwargs(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    kwargs = {key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    return kwargs


def _whole_head(head):
    """(weight, bias) of the LM-head module `head`, read inside a call of it, checked to be whole:
    under FSDP2 its group must be gathered then (a sharded weight here would need full_tensor(),
    whose gradient skips FSDP's reduce-scatter)."""
    if any(isinstance(p, DTensor) for p in (head.weight, head.bias) if p is not None):
        raise ValueError(
            "the LM head's weight is still sharded after the model's forward: FSDP2 resharded its group. "
            "Keep the LM head's group gathered after forward (fully_shard(..., reshard_after_forward=False) "
            "on a group holding lm_head, as accelerate's FSDP2 does, or leave lm_head in the root's group)")
    return head.weight, head.bias


def _shifted_targets(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[2B, T - 1]: position t predicts input_ids[t + 1]; -100 outside the completions."""
    completion = inputs["completion_mask"][:, 1:]
    return inputs["input_ids"][:, 1:].masked_fill(completion == 0, -100)


@dataclass
class _ScoredBatch:
    hidden: torch.Tensor  # [N, H] final hidden states of the packed tokens
    targets: torch.Tensor  # [N] next-token targets, -100 outside the completions
    layout: PackedLayout
    num_tokens: Any  # the batch's token count, as TRL logs it
    outputs: Any  # the model's outputs of a padded batch (router logits for the MoE loss); None when packed


@dataclass
class PaddingFreeCollator:
    """A preference collator whose padded batch is packed (``padding_free=True``).

    Calls `padded` (TRL's ``DataCollatorForPreference`` or one like it: input_ids,
    attention_mask and completion_mask [2B, T], chosen rows first) and packs its rows back to back
    with :func:`fastpref.train.packing.pack_rows`: ``{"packed": PackedPairs, ...}``, the other
    entries (precomputed reference log-probs) unchanged. The packing runs here, on the CPU.
    """

    padded: Callable[[List[Dict[str, Any]]], Dict[str, Any]]

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = dict(self.padded(examples))
        packed = pack_rows(batch.pop("input_ids"), batch.pop("attention_mask"), batch.pop("completion_mask"))
        return {"packed": packed, **batch}


class FastprefDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` on fastpref's fused op; same arguments, same objective and metrics.

    Every setting takes fastpref's loss but for a model without ``logits_to_keep`` (see the module
    documentation). ``self.uses_fused_loss`` says which this run takes; ``self.fastpref_loss`` is the
    :class:`fastpref.PreferenceLoss` of the former (None for the latter).
    """

    def __init__(self, *args, **kwargs):
        # trl.DPOTrainer's signature, bound here, so that every argument it takes is taken with its meaning
        given = _DPO_TRAINER_SIGNATURE.bind(self, *args, **kwargs)
        given.apply_defaults()
        arguments = dict(given.arguments)
        del arguments["self"]
        model, args, peft_config = arguments["model"], arguments["args"], arguments["peft_config"]
        if args is None:  # TRL's default, built here so that it is checked like a given one
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = arguments["args"] = DPOConfig(f"{name.split('/')[-1]}-DPO")
        # Settings are checked before TRL loads the model, tokenizes the data or precomputes reference log-probs.
        _refuse_unsupported_config(args)
        _refuse_tensor_parallel(model, args)
        _refuse_prompt_learning(model, peft_config)
        _refuse_vision(arguments["processing_class"])
        if isinstance(arguments["ref_model"], str):
            arguments["ref_model"] = _reference_from_path(arguments["ref_model"], args,
                                                          arguments["quantization_config"])
        padding_free = self.padding_free = args.padding_free
        # TRL 1.16 turns padding_free off with a warning; here the collator packs the batch instead
        args.padding_free = False
        try:
            # TRL's __init__ gives the policy and the reference model its fused head: fastpref's here
            with use_fastpref_head():
                super().__init__(**arguments)
        finally:
            args.padding_free = self.padding_free = padding_free
        self.data_collator = self._collator(self.data_collator)
        self._check_models()
        if self.padding_free and not self.uses_fused_loss:
            raise ValueError(
                f"padding_free=True with model={type(unwrap(self.model)).__name__}: its forward takes no "
                "logits_to_keep, so the packed batch's fused pair loss would build its full logits. Set "
                "padding_free=False")
        if self.padding_free and self.aux_loss_enabled:
            raise ValueError(
                f"padding_free=True with router_aux_loss_coef={self.router_aux_loss_coef!r}: the packed forward "
                "does not compute the MoE load-balancing loss; set padding_free=False or router_aux_loss_coef=0.0")

    __init__.__signature__ = _DPO_TRAINER_SIGNATURE

    # Both are decided once the models are loaded, which TRL's __init__ does before it precomputes
    # the reference log-probs with them.
    @functools.cached_property
    def uses_fused_loss(self) -> bool:
        """Whether this run takes the fused pair loss: wherever the models' forwards take
        logits_to_keep (else TRL's own loss code, on fastpref's head)."""
        return self._check_models()

    @functools.cached_property
    def fastpref_loss(self) -> Optional[PreferenceLoss]:
        """The fused pair loss of this run (None where it takes TRL's loss code)."""
        if not self.uses_fused_loss:
            return None
        # the policy's soft cap and logit scale, read off its config as TRL's own head reads them
        return preference_loss_of(self.args, causal_lm_parts(self.accelerator.unwrap_model(self.model)).transform)

    def _collator(self, collator):
        """`collator`, packing its batches when padding_free=True (idempotent)."""
        if self.padding_free and not isinstance(collator, PaddingFreeCollator):
            return PaddingFreeCollator(collator)
        return collator

    def _check_models(self) -> bool:
        """Refuse models the trainer cannot run; whether their forwards take logits_to_keep (the fused
        pair loss needs it to keep the model from building the full logits)."""
        _refuse_vision(self.processing_class)  # TRL loads one when none is given
        takes_logits_to_keep = True
        for model in (self.model, self.ref_model):
            if model is None:
                continue
            model = self.accelerator.unwrap_model(model)
            causal_lm_parts(model)  # raises for LM heads that are not a plain Linear
            base = model.get_base_model() if is_peft_model(model) else model
            takes_logits_to_keep &= "logits_to_keep" in inspect.signature(type(base).forward).parameters
        return takes_logits_to_keep

    @contextlib.contextmanager
    def _reference_setting(self):
        """TRL's setting of a reference forward: no grad, gradient checkpointing off, the PEFT model's
        "ref" adapter or none when there is no ref_model, the accelerator's mixed precision."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), adapter, \
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            yield

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one batch, as (chosen [B], rejected [B]).

        On the fused pair loss, the policy's computation run on the reference: the same forward
        (padded, or packed with ``padding_free=True``), the same head dtype, the same op call and
        the same sums (:meth:`fastpref.PreferenceLoss.sequence_logps`), so that a policy equal to
        its reference gets log-probs equal to the reference's bit for bit, as in TRL. Otherwise
        TRL's own code (``ld_alpha``'s reduction included) on the model's fused head. Precomputed
        (``precompute_ref_log_probs=True``) and online values come from this same computation.
        """
        if not self.uses_fused_loss:
            return super().compute_ref_log_probs(model, inputs)
        with self._reference_setting():
            scored = self._scored_batch(model, inputs)
            trainable_head = self._trains_head()
            logps = self._through_head(
                model, scored.hidden, lambda hidden, weight, bias: self.fastpref_loss.sequence_logps(
                    hidden, weight, scored.targets, scored.layout, bias=bias, trainable_head=trainable_head))
        return logps.chunk(2)

    def _trains_head(self) -> bool:
        return causal_lm_parts(self.accelerator.unwrap_model(self.model)).head_weight.requires_grad

    def _scored_batch(self, model, inputs, router_logits: bool = False) -> "_ScoredBatch":
        """The model's forward on a batch, as the fused pair loss scores it: the final hidden states of
        the completion tokens, packed (and the MoE router logits of a padded batch, when asked)."""
        packed: Optional[PackedPairs] = inputs.get("packed")
        if packed is not None:
            packed = packed.to(self.accelerator.device)
            hidden = packed_hidden(model, packed, self._attention(model))
            return _ScoredBatch(hidden, packed.targets, packed.layout, packed.input_ids.shape[1], None)
        model_kwargs = _model_kwargs(inputs)
        if router_logits:
            model_kwargs["output_router_logits"] = True
        # The wrapper's own forward keeps DDP's gradient synchronisation; logits_to_keep=1 makes the
        # model's LM head run on one position per row. hidden_states[-1] is the final, normed state.
        outputs = model(**model_kwargs, output_hidden_states=True, logits_to_keep=1)
        batch = pack_padded(outputs.hidden_states[-1][:, :-1], _shifted_targets(inputs))
        return _ScoredBatch(batch.hidden, batch.targets, batch.layout, inputs["attention_mask"].sum(), outputs)

    def _through_head(self, model, hidden, compute):
        """``compute(hidden, weight, bias)`` with the head of `model` read where it is whole (under
        DeepSpeed ZeRO-3 inside a call of its LM-head module: :func:`fastpref.causal_lm.call_through_head`),
        in the dtype fastpref's head computes in under the run's mixed precision (the rule of TRL's
        fused-head passes)."""
        def on_head(head, hidden):
            weight, bias = _whole_head(head)
            with self.accelerator.autocast():
                hidden, weight, bias = head_inputs(hidden, weight, bias)
            return compute(hidden, weight, bias)

        return call_through_head(self.accelerator.unwrap_model(model), on_head, hidden)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precomputation, on the run's own batches, cached under a key of its own.

        TRL caches the values by dataset and reference weights; without a key of their own, a
        TRL run and a fastpref run on the same data would read each other's values.
        """
        trl_key, collator = self._precompute_model_hash, self.data_collator
        self._precompute_model_hash = f"{trl_key}-fastpref{'-packed' if self.padding_free else ''}"
        self.data_collator = self._collator(collator)
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash, self.data_collator = trl_key, collator

    def _attention(self, model) -> str:
        return unwrap(self.accelerator.unwrap_model(model)).config._attn_implementation

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.uses_fused_loss:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        packed: Optional[PackedPairs] = inputs.get("packed")
        if packed is not None and return_outputs:
            raise ValueError(
                "padding_free=True: compute_metrics needs the logits of TRL's padded batch, which a packed "
                "batch has not; evaluate without compute_metrics, or set padding_free=False")
        if self.precompute_ref_logps:
            reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            reference = torch.cat(self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs))

        scored = self._scored_batch(model, inputs, router_logits=self.aux_loss_enabled)
        loss, metrics = self._through_head(model, scored.hidden, lambda hidden, weight, bias: self.fastpref_loss(
            hidden, weight, scored.targets, scored.layout, reference, bias=bias))
        outputs, layout = scored.outputs, scored.layout

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        self._log_metrics(mode, metrics, layout, scored.num_tokens)

        if return_outputs:
            warnings.warn(
                "return_outputs=True: the logits for compute_metrics are built by an extra forward "
                "over the full vocabulary, as in TRL", stacklevel=2)
            with torch.no_grad():
                outputs = model(**_model_kwargs(inputs))
            return loss, outputs
        return loss

    def _log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], layout: PackedLayout,
                     num_tokens) -> None:
        """TRL's metric keys with TRL's values: means over every pair, or every token, of every process."""
        lengths = layout.lengths.to(metrics["entropy"].dtype)
        tokens = {"all": lengths.sum(), "chosen": lengths[layout.chosen_index].sum(),
                  "rejected": lengths[layout.rejected_index].sum()}
        pairs = torch.full_like(tokens["all"], layout.num_pairs)
        weights = [pairs] * len(_PAIR_METRICS) + [tokens[over] for _, over in _TOKEN_METRICS]
        keys = list(_PAIR_METRICS) + [key for key, _ in _TOKEN_METRICS]
        weights = torch.stack(weights)
        sums = torch.stack([metrics[key].to(weights.dtype) for key in keys]) * weights
        total = self.accelerator.gather(torch.stack([sums, weights])[None]).sum(0)
        for key, value in zip(keys, (total[0] / total[1]).tolist()):
            self._metrics[mode][key].append(value)
        if mode == "train":
            if not isinstance(num_tokens, torch.Tensor):
                num_tokens = torch.tensor(num_tokens, device=lengths.device)
            num_tokens = self.accelerator.gather_for_metrics(num_tokens).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
