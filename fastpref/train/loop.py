"""The training loop: data, model, reference, fused loss, optimizer, checkpoints, monitoring."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shlex
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ..logit_transform import LogitTransform
from ..deferred_errors import raise_pending_errors
from ..losses import PreferenceLoss
from . import data as data_module
from .checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import TrainConfig, flag
from .distributed import Distributed
from .fsdp import check_setup as check_fsdp_setup
from .fsdp import decoder_layers
from .fsdp import shard as shard_for_fsdp
from .tensor_parallel import check_setup as check_tp_setup
from .tensor_parallel import clip_grad_norm_ as clip_grad_norm_for_tp
from .tensor_parallel import shard_head as shard_head_for_tp
from .memory import MemorySetting, longest_micro_batch, memory_report
from ..causal_lm import causal_lm_parts, unwrap
from .model import FusedHeadForward, adapters_disabled, model_fingerprint
from .monitor import DisplacementMonitor, MetricsLog, plot_metrics
from .named_models import resolve_model
from .packing import pack_completions, pack_pairs
from .quiet import peft_internals_quiet, transformers_progress_bars_off
from .reference import ReferenceCache, cache_key, default_cache_dir, packed_logps, pair_logps
from .sharded_checkpoint import is_sharded, load_sharded, save_sharded, verified_on_main
from .signals import StopRequests, TrainingInterrupted, signal_name
from .wording import count_of

HELDOUT_FILE = "heldout.jsonl"
INITIAL_DIR = "initial"
FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: Dict[str, float]  # on the training pairs
    eval_metrics: Optional[Dict[str, float]]  # on the held-out pairs, at the last step
    metrics_path: Path
    plot_path: Optional[Path]
    model_path: Path
    losses: List[float] = field(default_factory=list)
    reference_model: Optional[str] = None  # the model `fastpref eval` takes as the final model's reference
    eval_command: Optional[str] = None  # the `fastpref eval` command that scores the held-out pairs


def with_local_models(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with named models (smollm2-135m, ...) replaced by their converted folders (converted on
    first use)."""
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    local = {}
    for name in ("model", "reference_model"):
        given = getattr(cfg, name)
        if given is not None:
            local[name] = resolve_model(given, cache_root, flag="--" + name.replace("_", "-"), progress=cfg.progress)
    return dataclasses.replace(cfg, **local)


def make_writable_dir(directory: Path) -> None:
    """Create `directory` and prove it writable now, rather than after minutes of work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(f"--output-dir {directory} is not a writable directory: {error}") from None


def _check_max_length(max_length: int, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the model's context of {limit} tokens "
                         "(its max_position_embeddings)")


def device_and_dtype(cfg: TrainConfig, distributed: Distributed):
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def _attention(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type != "cuda":
        return "sdpa"
    if not cfg.prefix_sharing:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "flex_attention"


def _set_attention(model, attention: str, automatic: bool) -> str:
    """Set `attention` on `model`; an automatic choice the architecture does not support (Gemma-2's
    attention soft cap has no sdpa path) falls back to eager. Returns the implementation set."""
    try:
        model.set_attn_implementation(attention)
    except ValueError:
        if not automatic:
            raise
        model.set_attn_implementation("eager")
    return model.config._attn_implementation


def load_tokenizer(cfg: TrainConfig):
    if cfg.model is None:
        from .default_assets import default_tokenizer

        return default_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)


def _quantization(cfg: TrainConfig, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --load-in-4bit / --load-in-8bit, as TRL's
    get_quantization_config builds it (4-bit computing in the run's dtype); None without them."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant)


def _load_models(cfg: TrainConfig, tokenizer, device, dtype, attention):
    """(policy, frozen reference model or None, the embedded model's starting point or None). Under
    FSDP2 the weights stay float32 on the CPU: sharding moves each process's shard to the device,
    and mixed precision casts them. Quantized (QLoRA) models are loaded onto the device, their
    decoder-layer projections quantized by bitsandbytes, and prepared by PEFT for k-bit training
    (every weight frozen, the unquantized ones in float32) before the adapters are added."""
    if cfg.parallel == "fsdp":
        device, dtype = torch.device("cpu"), torch.float32
    from transformers import AutoModelForCausalLM

    from .default_assets import default_model

    quantization = _quantization(cfg, dtype)

    def load(path):
        if quantization is None:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                    quantization_config=quantization, device_map={"": str(device)})

    initial = None
    if cfg.model is None:
        policy = default_model(tokenizer, cfg.seed).to(dtype)
        # the embedded model exists nowhere else: its starting point is saved (once the run is known
        # to proceed) as the reference for `fastpref eval` and as the base of a LoRA adapter
        initial = copy.deepcopy(policy)
        policy.name_or_path = str(Path(cfg.output_dir) / INITIAL_DIR)
        policy.to(device)
    else:
        policy = load(cfg.model)
    attention = _set_attention(policy, attention, cfg.attn_implementation == "auto")
    reference = None
    if cfg.reference_model is not None:
        reference = load(cfg.reference_model)
        _set_attention(reference, attention, automatic=False)
        reference.eval().requires_grad_(False)
        if reference.get_output_embeddings().weight.shape != policy.get_output_embeddings().weight.shape:
            raise ValueError("the reference model's LM head does not match the policy's vocabulary")
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing is turned on below, as for every model
        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # the older name warns in recent transformers
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules or [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        with peft_internals_quiet():
            policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                       lora_dropout=cfg.lora_dropout, target_modules=targets))
    return policy, reference, initial


def _schedule(cfg: TrainConfig, optimizer, total_steps: int):
    """transformers' schedulers with TRL's warmup of warmup_steps, else ceil(warmup_ratio * steps) steps, so that a
    run's learning rates are step for step those of the same run under TRL (the first step's is 0
    whenever there is a warmup)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _preference_loss(cfg: TrainConfig, transform: LogitTransform = LogitTransform()) -> PreferenceLoss:
    return PreferenceLoss(cfg.loss_type, beta=cfg.beta, loss_weights=cfg.loss_weights,
                          label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                          discopop_tau=cfg.discopop_tau, f_divergence_type=cfg.f_divergence_type,
                          f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, use_weighting=cfg.use_weighting,
                          ld_alpha=cfg.ld_alpha,
                          desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                          average_logps=cfg.average_logps, logit_scale=transform.logit_scale,
                          softcap=transform.softcap, temperature=transform.temperature, backend=cfg.backend,
                          gradients_in_forward=cfg.gradients_in_forward, group_rows=cfg.group_rows)


# A step whose gradients hold NaN or inf is skipped; this many in a row stop the run.
MAX_SKIPPED_IN_A_ROW = 10


def _read_metrics(records: Sequence[Dict[str, torch.Tensor]]) -> List[Dict[str, float]]:
    """Records of 0-d tensors as floats, read from the device in one transfer."""
    if not records:
        return []
    values = torch.stack([value.detach().float() for record in records for value in record.values()]).tolist()
    read, position = [], 0
    for record in records:
        read.append(dict(zip(record, values[position:position + len(record)])))
        position += len(record)
    return read


def _mean_of_numbers(values: Sequence[float]) -> float:
    numbers = [value for value in values if not math.isnan(value)]
    return sum(numbers) / len(numbers) if numbers else float("nan")


def _interval_record(records: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The steps since the last log as one record, as TRL logs them: the metrics averaged over
    the steps that have them (KTO's per-label metrics are NaN for a step without an example of the
    label), tokens and skipped updates summed, and step, epoch and learning rate those of the last."""
    last = records[-1]
    merged = {k: _mean_of_numbers([r[k] for r in records]) for k in last if k not in ("step", "split", "epoch", "lr")}
    merged.update(step=last["step"], split=last["split"], epoch=last["epoch"], lr=last["lr"],
                  tokens=sum(r["tokens"] for r in records), skipped_updates=sum(r["skipped_updates"] for r in records))
    merged["tokens_per_s"] = merged["tokens"] / sum(r["tokens"] / r["tokens_per_s"] for r in records)
    return {"step": merged.pop("step"), "split": merged.pop("split"), **merged}


def _loss_weight(items: Sequence) -> int:
    """What the loss of `items` averages over: their pairs (a group's several), or their unpaired examples."""
    return sum(len(getattr(item, "pairs", (None,))) for item in items)


# KTO's per-label metrics: means over the desirable (True) or the undesirable (False) examples
LABEL_METRICS = {"rewards/chosen": True, "logps/chosen": True, "rewards/rejected": False, "logps/rejected": False}
LABEL_SHARES = {True: "desirable_share", False: "undesirable_share"}


def _per_label(record: Dict, examples: Sequence) -> Dict:
    """A KTO record ready for the mean over the examples of many (the processes', the steps'):
    each per-label mean times the label's share of `examples`, beside that share. The mean of
    the first over examples divided by the mean of the second (:func:`_label_means`) is the mean
    over all the label's examples, as TRL's KTOTrainer sums and counts them over its processes."""
    record = dict(record)
    for label, share in LABEL_SHARES.items():
        # made on the device by a fill, not copied there: no synchronisation
        record[share] = record["loss"].new_full((), sum(example.label == label for example in examples) / len(examples))
    for key, label in LABEL_METRICS.items():
        record[key] = record[key] * record[LABEL_SHARES[label]]
    return record


def _label_means(mean: Dict[str, float]) -> Dict[str, float]:
    """The means of :func:`_per_label` records over the examples turned into per-label means (NaN
    for a label with no example), and TRL's margin between them."""
    shares = {label: mean.pop(share) for label, share in LABEL_SHARES.items()}
    for key, label in LABEL_METRICS.items():
        mean[key] = mean[key] / shares[label] if shares[label] else float("nan")
    mean["rewards/margins"] = mean["rewards/chosen"] - mean["rewards/rejected"]
    return mean


class Trainer:
    """Holds a run's state; `train()` below is the entry point."""

    def __init__(self, cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None):
        # a tensor-parallel run's processes share every batch: one data-parallel process
        self.cfg = cfg.resolved(1 if cfg.parallel == "tp" else Distributed.environment_world_size())
        self.on_step = on_step
        self.output_dir = Path(self.cfg.output_dir)
        created = not self.output_dir.exists()
        make_writable_dir(self.output_dir)
        try:
            self._start()
        except BaseException:
            if created:  # a failed start leaves nothing behind
                shutil.rmtree(self.output_dir, ignore_errors=True)
            raise

    def _start(self):
        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.loss_fn = _preference_loss(cfg)  # a bad loss configuration fails before any long work
        # KTO trains on unpaired examples (TokenizedCompletion), the others on pairs (TokenizedPair):
        # the "pairs" below (train_pairs, ...) are either
        self.unpaired = not self.loss_fn.spec.is_paired
        self._unit = "example" if self.unpaired else "group" if cfg.group_by_prompt else "pair"
        check_fsdp_setup(cfg.parallel, Distributed.environment_world_size(), cfg.pairs_per_step)
        check_tp_setup(cfg.parallel, Distributed.environment_world_size(), cfg.lora_r)
        self.dist = Distributed.from_environment(cfg.device)
        if cfg.parallel == "tp":  # every process runs every micro-batch, the head's vocabulary split
            self.dist = dataclasses.replace(self.dist, data_parallel=False)
        self.device, self.dtype = device_and_dtype(cfg, self.dist)
        self.attention = _attention(cfg, self.device)
        self._say(self._header())
        self.eval_reference = self._eval_reference()  # as the user named it, before names become folders
        self.cfg = cfg = with_local_models(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self._load_data()
        self.policy, self.reference_model, self.initial_model = _load_models(
            cfg, self.tokenizer, self.device, self.dtype, self.attention)
        _check_max_length(cfg.max_length, self.policy)
        self.attention = self.policy.config._attn_implementation
        # the policy's logit transform (soft cap, logit scale), read off its config as TRL does
        self.loss_fn = _preference_loss(cfg, causal_lm_parts(self.policy).transform)
        self.fsdp = cfg.parallel == "fsdp"
        # the policy's parameters are DTensors (all under fsdp, the head's under tp): checkpoints
        # go through torch.distributed.checkpoint
        self.sharded = cfg.parallel in ("fsdp", "tp")
        # under FSDP2 an unsupported model fails here, before any long work
        self.layers = decoder_layers(self.policy) if self.fsdp else []
        self._prepare_reference()
        # the head models run the forward and the fused loss in one module call (model.py)
        self.head_model = self._parallel(FusedHeadForward(self.policy))
        self.forward_model = self.head_model
        if self.dist.enabled and cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.head_model, device_ids=device_ids)
        self.reference_head = None
        if self.reference_model is not None:
            self.reference_head = self._parallel(FusedHeadForward(self.reference_model))
        self._fill_reference_cache()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = _schedule(cfg, self.optimizer, self.total_steps)
        # the longest micro-batch this process can get, from the lengths of the pairs it will train on
        local_pairs = -(-cfg.pairs_per_step // self.dist.data_processes)
        tokens, scored = longest_micro_batch(self.trained_pairs, local_pairs, cfg.prefix_sharing)
        adaptation = ("qlora-4bit" if cfg.load_in_4bit else "qlora-8bit" if cfg.load_in_8bit else
                      "lora" if cfg.lora_r else "full")
        setting = MemorySetting(
            adaptation=adaptation, gradient_checkpointing=cfg.gradient_checkpointing,
            sharding="zero3" if self.fsdp else "none", processes=self.dist.world_size, lora_r=cfg.lora_r,
            compute_bytes=torch.empty((), dtype=self.dtype).element_size(), device_type=self.device.type,
            attention=self.attention, nested_quantization=cfg.use_bnb_nested_quant)
        self.memory_lines = memory_report(
            self.policy, self.reference_model, rank=self.dist.rank, setting=setting,
            reference=self._reference_source() if self.loss_fn.spec.needs_reference else None,
            pairs=min(local_pairs, len(self.trained_pairs)), tokens=tokens, scored_tokens=scored,
            decoder_layers=self.layers, unit=self._unit)
        self.step = 0
        self._skipped_in_a_row = 0  # steps whose NaN or inf gradients skipped the update
        self.displacement = DisplacementMonitor(suggest_sft=not self.unpaired)

    def _header(self) -> str:
        """What will run, shown before any work starts."""
        from .. import backends

        cfg = self.cfg
        try:
            backend = backends.resolve(cfg.backend, self.device).name
        except RuntimeError as error:
            raise ValueError(f"backend={cfg.backend!r}: {error}") from None
        losses = cfg.loss_type if isinstance(cfg.loss_type, list) else [cfg.loss_type]
        if not self.loss_fn.spec.needs_reference:
            reference = "none (reference-free loss)"
        elif cfg.precompute_ref_log_probs:
            reference = "log-probs precomputed once and cached"
        else:
            reference = "computed every step"
        length = (count_of(cfg.num_train_epochs, "epoch", number_format="g") if cfg.max_steps is None
                  else count_of(cfg.max_steps, "step"))
        processes = (f"{self.dist.world_size} processes ({cfg.parallel})" if self.dist.enabled else "1 process")
        weights = (f", desirable weight {cfg.desirable_weight:g}, undesirable weight {cfg.undesirable_weight:g}"
                   if not self.loss_fn.spec.is_paired else "")
        lines = [
            f"fastpref train: {' + '.join(losses)} loss (beta {cfg.beta:g}{weights}) of "
            f"{cfg.model or 'the embedded tiny Llama (random weights)'} on "
            f"{cfg.data or 'the bundled HH-RLHF sample'}"
            + (f", LoRA r {cfg.lora_r}" if cfg.lora_r else ", full fine-tune") + self._quantization_words(),
            f"  {length}, {count_of(cfg.pairs_per_step, self._unit)} per micro-batch x "
            f"{cfg.gradient_accumulation_steps} accumulated, learning rate {cfg.learning_rate:g} "
            f"({cfg.lr_scheduler_type}), {self._unit}s cut to {cfg.max_length} tokens (prompt {cfg.max_prompt_length})",
            f"  {self.device} ({str(self.dtype).replace('torch.', '')}), {processes}, backend {backend}, "
            f"attention {self.attention}; reference: {reference}",
            f"  output: {self.output_dir}",
        ]
        return "\n".join(lines)

    def _quantization_words(self) -> str:
        cfg = self.cfg
        if cfg.load_in_4bit:
            return (f" on a 4-bit ({cfg.bnb_4bit_quant_type}{', double-quantized' if cfg.use_bnb_nested_quant else ''})"
                    " model (QLoRA)")
        return " on an 8-bit model (QLoRA)" if cfg.load_in_8bit else ""

    def _eval_reference(self) -> str:
        """The model `fastpref eval` takes as the final model's reference: the reference model given,
        else the model the run started from: the embedded model's starting point, saved in initial/
        (it exists nowhere else), or the model given, by its name or folder: a run keeps no copy of a
        model that is on disk already (a packaged one is rebuilt from its package, identically)."""
        if self.cfg.reference_model is not None:
            return self.cfg.reference_model
        return str(self.output_dir / INITIAL_DIR) if self.cfg.model is None else self.cfg.model

    def _eval_command(self) -> Optional[str]:
        """The `fastpref eval` command that scores the held-out pairs at the run's lengths, or None when
        there are none (or they are unpaired examples, which `fastpref eval` does not score)."""
        if not self.heldout_rows or not self.heldout_are_pairs:
            return None
        cfg = self.cfg
        words = ["fastpref", "eval", "--model", str(self.output_dir / FINAL_DIR), "--reference-model",
                 self.eval_reference, "--data", str(self.output_dir / HELDOUT_FILE), "--beta", f"{cfg.beta:g}",
                 "--max-length", str(cfg.max_length), "--max-prompt-length", str(cfg.max_prompt_length)]
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name in ("truncation_mode", "data_format", "cache_dir"):
            if getattr(cfg, name) != defaults[name]:
                words += [flag(name), getattr(cfg, name)]
        return " ".join(shlex.quote(word) for word in words)

    def _say(self, text: str) -> None:
        """A line for the console, from the main process only, shown with or without progress bars."""
        if self.dist.is_main:
            tqdm.write(text)

    def _reference_source(self) -> str:
        return "cache" if self.cfg.precompute_ref_log_probs else "online"

    # -- data and reference ------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        rows = data_module.load_rows(cfg.data, split=cfg.split)
        options = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       truncation_mode=cfg.truncation_mode, on_malformed=cfg.on_malformed, format=cfg.data_format)
        self.heldout_are_pairs = not data_module.is_unpaired(rows)
        if not self.heldout_are_pairs:
            if not self.unpaired:
                raise ValueError(f"the data holds unpaired examples (completion, label); loss types "
                                 f"{list(self.loss_fn.spec.loss_types)} need pairs (chosen, rejected): train it "
                                 "with loss_type kto")
            examples, self.data_report = data_module.tokenize_unpaired(rows, self.tokenizer, **options)
            if not examples:
                raise ValueError("no usable examples in the data:\n" + self.data_report.summary())
            examples = data_module.with_kl_completions(examples, cfg.max_length)
            self.train_pairs, self.eval_pairs = data_module.train_eval_split(examples, cfg.eval_fraction, cfg.seed)
        else:
            pairs, self.data_report = data_module.tokenize_pairs(rows, self.tokenizer, **options)
            if not pairs:
                raise ValueError("no usable preference pairs in the data:\n" + self.data_report.summary())
            if cfg.group_by_prompt:
                # split by prompt: no pair of a held-out prompt is trained on
                groups = data_module.group_by_prompt(pairs)
                self.train_pairs, self.eval_pairs = data_module.train_eval_split(groups, cfg.eval_fraction, cfg.seed)
            else:
                self.train_pairs, self.eval_pairs = data_module.train_eval_split(pairs, cfg.eval_fraction, cfg.seed)
            if self.unpaired:
                # split as pairs, so that no half of a held-out pair is trained on
                examples = data_module.with_kl_completions(data_module.unpair(pairs), cfg.max_length)
                held_out = {pair.row for pair in self.eval_pairs}
                self.train_pairs = [e for e in examples if e.row not in held_out]
                self.eval_pairs = [e for e in examples if e.row in held_out]
        if self.unpaired:
            self.data_fingerprint = data_module.fingerprint_completions(examples)
        elif cfg.group_by_prompt:
            self.data_fingerprint = data_module.fingerprint_groups(groups)
        else:
            self.data_fingerprint = data_module.fingerprint_pairs(pairs)
        # the held-out rows as they were read, for `fastpref eval --data OUTPUT_DIR/heldout.jsonl`
        self.heldout_rows = rows.select(list(dict.fromkeys(
            row for p in self.eval_pairs for row in getattr(p, "rows", (p.row,))))).to_list()
        micro_per_epoch = math.ceil(len(self.train_pairs) / cfg.pairs_per_step)
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, int(cfg.num_train_epochs * self.steps_per_epoch))
        self.trained_pairs = self._trained_pairs()
        self.scored_train_pairs = self.trained_pairs[:cfg.score_train_pairs]
        self._say(self.data_report.summary())
        per_step, unit = cfg.pairs_per_step * cfg.gradient_accumulation_steps, self._unit
        self._say(f"{count_of(len(self.train_pairs), 'training ' + unit)}, {len(self.eval_pairs)} held out: "
                  f"{count_of(self.total_steps, 'step')} of up to {count_of(per_step, unit)} train on "
                  f"{len(self.trained_pairs)} of the training {unit}s "
                  f"({count_of(self.total_steps / self.steps_per_epoch, 'epoch', number_format='.3g')})")
        if self.unpaired:
            self._say(self._label_balance())

    def _label_balance(self) -> str:
        """The training examples by label, and a warning where their weighted counts fall outside
        the KTO paper's advice (its eq. 8, which TRL's KTOTrainer checks too)."""
        cfg = self.cfg
        desirable = sum(example.label for example in self.train_pairs)
        undesirable = len(self.train_pairs) - desirable
        line = f"{desirable} desirable and {undesirable} undesirable training examples"
        if not desirable or not undesirable:
            return line + ": warning, KTO then learns from one kind of example only"
        ratio = cfg.desirable_weight * desirable / (cfg.undesirable_weight * undesirable)
        if 1 <= ratio <= 4 / 3:
            return line
        low = undesirable * cfg.undesirable_weight / desirable
        return (line + f": warning, desirable weight x desirable examples / (undesirable weight x undesirable "
                f"examples) is {ratio:.3g}, where the KTO paper advises 1 to 4/3: e.g. --desirable-weight "
                f"{low:.3g} to {low * 4 / 3:.3g}")

    def _epoch_order(self, epoch: int) -> List[int]:
        """The training pairs' order in `epoch`: fixed by the seed, so a resumed run sees the same."""
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return torch.randperm(len(self.train_pairs), generator=generator).tolist()

    def _trained_pairs(self) -> List:
        """Every pair the run's steps train on, each once, in the order they are first trained."""
        per_step = self.cfg.pairs_per_step * self.cfg.gradient_accumulation_steps
        seen: Dict[int, None] = {}
        for first_step in range(0, self.total_steps, self.steps_per_epoch):
            steps = min(self.steps_per_epoch, self.total_steps - first_step)
            seen.update(dict.fromkeys(self._epoch_order(first_step // self.steps_per_epoch)[:steps * per_step]))
            if len(seen) == len(self.train_pairs):
                break
        return [self.train_pairs[i] for i in seen]

    def _parallel(self, head_model: FusedHeadForward) -> FusedHeadForward:
        """`head_model` sharded under FSDP2, its LM head sharded under tp; as it is otherwise (DDP
        wraps the policy's alone)."""
        if self.cfg.parallel == "tp":
            shard_head_for_tp(head_model.model, self.device, self.dist.world_size)
            return head_model
        if not self.fsdp:
            return head_model
        return shard_for_fsdp(head_model, self.device, self.dist.world_size, self.dtype)

    def _prepare_reference(self):
        """The reference's source, fixed before the policy is wrapped: the cache key (which reads
        the whole weights) and, online in a full fine-tune, a frozen copy of the starting policy."""
        cfg = self.cfg
        self.reference_cache = None
        self.reference_key = None
        if not self.loss_fn.spec.needs_reference:
            return
        if not cfg.precompute_ref_log_probs:
            if self.reference_model is None and cfg.lora_r == 0:
                # a full fine-tune moves the policy: the reference is a frozen copy of its start
                self.reference_model = copy.deepcopy(self.policy).eval().requires_grad_(False)
            return
        source = self.reference_model or self.policy
        # rank 0's key on every rank, so that all read and write the same pieces
        self.reference_key = self.dist.broadcast_object(
            cache_key(model_fingerprint(source), self.data_fingerprint, self.dtype, self.loss_fn.spec.ld_alpha))

    def _fill_reference_cache(self):
        """The reference log-probs of the pairs this run uses (those it trains on and the held-out
        ones), from the cache where it has them; every process computes its share of each batch
        of the others, and rank 0 writes them into the cache as they come. SIGTERM or SIGUSR1
        stops the pass after the batch at hand, keeping what was computed."""
        if self.reference_key is None:
            return
        cfg = self.cfg
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        pairs = self._reference_items(self.trained_pairs + self.eval_pairs)
        # rank 0 reads the pieces: every process then computes the same missing pairs, batch by batch
        directory = ReferenceCache.directory_for(cache_dir, self.reference_key)
        stored = self.dist.broadcast_object(
            ReferenceCache.stored(directory, self.reference_key) if self.dist.is_main else None)
        cached = sum(pair.row in stored for pair in pairs)
        missing = len(pairs) - cached
        if not missing:
            self._say(f"reference log-probs: all {count_of(len(pairs), self._unit)} from the cache in {directory}")
        elif cached:
            self._say(f"reference log-probs: {cached} of {count_of(len(pairs), self._unit)} from the cache in "
                      f"{directory}, {count_of(missing, self._unit)} to compute")
        with StopRequests() as stop:
            self.reference_cache = ReferenceCache.load_or_compute(
                self.reference_key, pairs, self._reference_logps_shared, cache_dir=cache_dir,
                batch_pairs=cfg.pairs_per_step, progress=cfg.progress and self.dist.is_main, stored=stored,
                write=self.dist.is_main, unit=self._unit,
                stop_requested=lambda: bool(self.dist.max_over_ranks(stop.received or 0, self.device)))
            self.dist.barrier()
            received = self.dist.max_over_ranks(stop.received or 0, self.device)
        if received:
            done = sum(pair.row in self.reference_cache.values for pair in pairs)
            raise TrainingInterrupted(
                f"stopped by {signal_name(received)} during the reference pass: the log-probs of {done} of "
                f"{count_of(len(pairs), self._unit)} are saved in {self.reference_cache.directory}; run the same "
                "command again to compute the rest and train", received)

    def _reference_logps_now(self, pairs) -> torch.Tensor:
        """The reference model's, or else the policy's with adapters disabled (LoRA) or before
        any step (the cache of a full fine-tune is computed before training starts)."""
        model = self.reference_head if self.reference_head is not None else self.head_model
        was_training = model.training
        model.eval()
        # as the policy's pass computes them: the same weights give the same log-probs, bit for bit
        trainable_head = causal_lm_parts(self.policy).head_weight.requires_grad
        with adapters_disabled(self.policy if self.reference_head is None else self.reference_model):
            logps = pair_logps(model, pairs, self.attention, self.device, prefix_sharing=self.cfg.prefix_sharing,
                               scored_as=self.loss_fn, trainable_head=trainable_head)
        model.train(was_training)
        return logps

    def _reference_logps_shared(self, pairs) -> torch.Tensor:
        """`_reference_logps_now` of `pairs`, each process scoring its share (a process without
        one scores a pair it then drops: a sharded model needs every process in every forward)."""
        if not self.dist.enabled:
            return self._reference_logps_now(pairs)
        local = self.dist.shard(pairs)
        scored = local or pairs[:1]
        logps = self._reference_logps_now(scored).cpu().split([len(item.responses) for item in scored])
        per_item = self.dist.gather_shards(list(logps) if local else [], len(pairs))
        return torch.cat(per_item).to(self.device)

    def _reference_items(self, pairs) -> List:
        """What the reference scores of `pairs`: the pairs, or each unpaired example's completion and
        KL completion as a pair (under the example's key)."""
        return [example.with_kl_completion() for example in pairs] if self.unpaired else list(pairs)

    def _reference_for(self, pairs) -> Optional[torch.Tensor]:
        """[S]: each pair's (chosen, rejected) or group's responses, or each unpaired example's (completion,
        KL completion)."""
        if not self.loss_fn.spec.needs_reference:
            return None
        items = self._reference_items(pairs)
        if self.reference_cache is not None:
            return self.reference_cache.lookup([item.row for item in items], self.device)
        return self._reference_logps_now(items)

    # -- one batch -----------------------------------------------------------------------------
    def _batch_loss(self, pairs, model, counted: bool = True):
        """`model`: the policy's FusedHeadForward, wrapped by DDP or not. `counted`: False for a
        placeholder batch (a process without a share of the batch), left out of KTO's KL estimate."""
        if not self.unpaired:
            packed = pack_pairs(pairs, prefix_sharing=self.cfg.prefix_sharing)  # host work, validated on the CPU
            return self._device_loss(packed, self._reference_for(pairs), model)
        reference = self._reference_for(pairs).view(-1, 2)
        kl = self._kto_reference_point(pairs, reference[:, 1], counted)
        return self._device_loss(pack_completions(pairs), reference[:, 0], model, kto_kl=kl)

    def _kto_reference_point(self, examples, reference_kl_logps: torch.Tensor, counted: bool) -> torch.Tensor:
        """KTO's z0, as TRL's KTOTrainer estimates it: the mean, over the micro-batch's examples (every
        process's share), of log pi(y'|x) - log pi_ref(y'|x) on each example's mismatched KL sequence,
        the policy's as it is now and without a gradient, clamped at 0. (TRL averages the processes'
        means; the mean over the examples is the same for equal shares, and the same run on any number
        of processes otherwise.)"""
        policy_kl_logps = packed_logps(self.head_model, pack_completions(examples, kl=True), self.attention,
                                       self.device, backend=self.cfg.backend)
        difference = policy_kl_logps - reference_kl_logps
        total = torch.stack([difference.sum(), torch.ones_like(difference).sum()]) * float(counted)
        total = self.dist.sum_over_ranks(total)
        return (total[0] / total[1]).clamp(min=0)

    def _device_loss(self, packed, reference, model, kto_kl=None):
        """The loss of a packed batch on the device: nothing in it reads a tensor back on the host (bad
        values are flagged and raised when the step's metrics are read, see _train_step)."""
        packed = packed.to(self.device)

        def loss(hidden, weight, bias):
            return self.loss_fn(hidden, weight, packed.targets, packed.layout, reference, bias=bias, kto_kl=kto_kl)

        loss, metrics = model(packed, self.attention, loss)
        return loss, metrics, packed.input_ids.shape[1]

    def _micro_batches(self, step: int) -> List[List]:
        """The pairs of optimizer step `step`: fixed by the seed, so a resumed run sees the same."""
        cfg = self.cfg
        per_step = cfg.pairs_per_step * cfg.gradient_accumulation_steps
        epoch, index = divmod(step, self.steps_per_epoch)
        chosen = self._epoch_order(epoch)[index * per_step:(index + 1) * per_step]
        batches = [chosen[i:i + cfg.pairs_per_step] for i in range(0, len(chosen), cfg.pairs_per_step)]
        return [[self.train_pairs[i] for i in batch] for batch in batches]

    def evaluate(self, pairs, split: str, description: str) -> Optional[Dict[str, float]]:
        """Loss and metrics over `pairs`, each rank scoring its share; `description` names them on the
        progress bar."""
        if not pairs:
            return None
        self.head_model.eval()
        records, weights = [], []
        # a real model scores a few pairs a second on a CPU: minutes for a held-out set
        bar = tqdm(total=len(pairs), desc=f"scoring {description}", unit=self._unit, leave=False,
                   disable=not (self.cfg.progress and self.dist.is_main))
        with torch.no_grad(), bar:
            # the same global batches on every process: a sharded model needs all in every forward
            for start in range(0, len(pairs), self.cfg.pairs_per_step):
                batch = pairs[start:start + self.cfg.pairs_per_step]
                local = self.dist.shard(batch)
                # a process without a pair of this batch scores a placeholder, with weight 0
                scored = local or pairs[:1]
                loss, metrics, _ = self._batch_loss(scored, self.head_model, counted=bool(local))
                record = {"loss": loss, **metrics}
                records.append(_per_label(record, scored) if self.unpaired else record)
                weights.append(_loss_weight(local))
                bar.update(len(batch))
        self.head_model.train()
        raise_pending_errors()
        mean = self.dist.weighted_mean(_read_metrics(records), weights, self.device)
        if self.unpaired:
            mean = _label_means(mean)
        return {"step": self.step, "split": split, f"{self._unit}s": len(pairs), **mean}

    # -- checkpoints ---------------------------------------------------------------------------
    def _trainable_state(self):
        if self.cfg.lora_r > 0:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.policy)
        return self.policy.state_dict()

    def _run_identity(self) -> Dict:
        keys = ("model", "loss_type", "beta", "pairs_per_step", "gradient_accumulation_steps", "seed", "lora_r",
                "prefix_sharing", "group_by_prompt", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "max_length",
                "max_prompt_length")
        if self.unpaired:
            keys += ("desirable_weight", "undesirable_weight")
        identity = {k: getattr(self.cfg, k) for k in keys}
        identity.update(data=self.data_fingerprint, total_steps=self.total_steps)
        return json.loads(json.dumps(identity))

    def save(self) -> Path:
        directory = self.output_dir / f"checkpoint-{self.step}"
        meta = {"run": self._run_identity(), "step": self.step, "world_size": self.dist.world_size}
        progress = {"step": self.step, "displacement": vars(self.displacement)}
        if self.sharded:
            save_sharded(directory, self.policy, self.optimizer,
                         {"scheduler": self.scheduler.state_dict(), "progress": progress}, meta, self.dist,
                         trainable_only=self.cfg.lora_r > 0)
        elif self.dist.is_main:
            save_checkpoint(directory, {
                "model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "progress": progress,
            }, meta=meta)
        if self.dist.is_main:
            for old in list_checkpoints(self.output_dir)[:-self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return directory

    def restore(self, directory: Path) -> None:
        manifest = verified_on_main(directory, self.dist)
        expected, found = self._run_identity(), manifest["meta"].get("run", {})
        differing = sorted(k for k in expected if expected[k] != found.get(k))
        if differing:
            raise CheckpointError(
                f"checkpoint {directory} belongs to a different run: {', '.join(differing)} differ; "
                "use another --output-dir or --resume-from-checkpoint never")
        if is_sharded(manifest):
            # torch.distributed.checkpoint reshards to this run's world size and wrapping
            state = load_sharded(directory, self.policy, self.optimizer, self.dist,
                                 trainable_only=self.cfg.lora_r > 0)
        elif self.sharded:
            raise CheckpointError(
                f"checkpoint {directory} is a whole-model checkpoint of a run without --parallel {self.cfg.parallel}; "
                "resume it with --parallel ddp (or one process), or start anew with --resume-from-checkpoint never")
        else:
            state = load_checkpoint(directory, manifest=manifest)
            if self.cfg.lora_r > 0:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.policy, state["model"])
            else:
                self.policy.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["progress"]["step"]
        vars(self.displacement).update(state["progress"]["displacement"])

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        resume_from = None
        if cfg.resume_from_checkpoint == "auto":
            resume_from = latest_checkpoint(self.output_dir)
        elif cfg.resume_from_checkpoint != "never":
            resume_from = Path(cfg.resume_from_checkpoint)
        finished = self._finished_run() if cfg.resume_from_checkpoint == "auto" else None
        if finished is not None:
            return finished
        if resume_from is not None:
            self.restore(resume_from)  # refuses another run's checkpoint before anything is written
            self._say(f"resuming from {resume_from} (step {self.step} of {self.total_steps})")
        self._write_run_files()
        log = MetricsLog(self.output_dir / "metrics.jsonl", resume_step=self.step if resume_from else None,
                         tensorboard_dir=self.output_dir / "tensorboard" if cfg.tensorboard else None,
                         enabled=main)
        print("\n".join(self.memory_lines), flush=True)  # every process: its own share
        self.policy.train()
        losses: List[float] = []
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and main))
        started = time.perf_counter()
        last_eval = None
        unlogged: List[Dict[str, float]] = []
        try:
            with StopRequests() as stop:
                while self.step < self.total_steps:
                    record = self._train_step()
                    losses.append(record["loss"])
                    unlogged.append(record)
                    if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                        log.write(_interval_record(unlogged))
                        unlogged = []
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                    margin=f"{record['rewards/margins']:.3f}")
                    warning = (None if math.isnan(record["rewards/margins"]) else  # a KTO step of one label
                               self.displacement.update(record["logps/chosen"], record["rewards/margins"]))
                    if record["skipped_updates"]:
                        warning = (f"step {self.step}: NaN or inf gradients (non-finite log-probs: "
                                   f"{record['non_finite_logps']:.0%} of the sequences), the update was skipped")
                    if warning:
                        self._say("warning: " + warning)
                        log.write({"step": self.step, "split": "warning", "message": warning})
                    if self.step % cfg.eval_steps == 0 or self.step == self.total_steps:
                        evaluation = self.evaluate(self.eval_pairs, "eval", f"held-out {self._unit}s")
                        if evaluation:
                            log.write(evaluation)
                            last_eval = evaluation
                    saved = self.step % cfg.save_steps == 0 and self.step < self.total_steps
                    if saved:
                        self.save()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    # every process asks whether any was signalled, so that all stop (and save) together
                    received = self.dist.max_over_ranks(stop.received or 0, self.device)
                    if received and self.step < self.total_steps:
                        if unlogged:
                            log.write(_interval_record(unlogged))
                        path = self.output_dir / f"checkpoint-{self.step}" if saved else self.save()
                        log.close()
                        raise TrainingInterrupted(
                            f"stopped by {signal_name(received)} at step {self.step} of {self.total_steps}: "
                            f"checkpoint saved to {path}; run the same command again to resume", received)
        except KeyboardInterrupt:
            log.close()
            if self.sharded:
                # a sharded save needs every process at the same point, which an interrupt
                # arriving mid-step does not give: saving could hang
                last = latest_checkpoint(self.output_dir)
                raise TrainingInterrupted(
                    f"interrupted at step {self.step}: under --parallel {cfg.parallel} nothing is saved on an "
                    f"interrupt (SIGTERM saves); the latest checkpoint is {last}; run the same command "
                    "again to resume from it") from None
            path = self.save()
            raise TrainingInterrupted(f"interrupted at step {self.step}: checkpoint saved to {path}; "
                                      "run the same command again to resume") from None
        finally:
            bar.close()
        final = None
        if self.scored_train_pairs:
            final = self.evaluate(self.scored_train_pairs, "train-final", f"trained {self._unit}s")
            log.write(final)
        log.close()
        model_path = self.output_dir / FINAL_DIR
        plot_path = None
        final_state = self._gathered_state() if self.sharded else None
        eval_command = self._eval_command()
        if main:
            plot_path = plot_metrics(log.path, self.output_dir / "metrics.png")
            self._save_final(model_path, final_state)
            summary = {"final_eval": last_eval, "final_train": final, "steps": self.step,
                       "run": self._run_identity(), "data": self.data_report.to_dict(),
                       "world_size": self.dist.world_size, "elapsed_s": time.perf_counter() - started,
                       "reference_model": self.eval_reference, "eval_command": eval_command}
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        self.dist.barrier()
        return TrainResult(self.output_dir, self.step, final, last_eval, log.path, plot_path, model_path, losses,
                           self.eval_reference, eval_command)

    def _write_run_files(self) -> None:
        """What the run keeps beside its checkpoints, written once it is known to proceed: the
        held-out rows, and the embedded model's starting point."""
        if not self.dist.is_main:
            return
        (self.output_dir / HELDOUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.heldout_rows))
        if self.initial_model is not None:
            with transformers_progress_bars_off():
                self.initial_model.save_pretrained(self.output_dir / INITIAL_DIR)
            self.tokenizer.save_pretrained(self.output_dir / INITIAL_DIR)

    def _finished_run(self) -> Optional[TrainResult]:
        """The result of this very run when the output directory already holds it complete."""
        path = self.output_dir / SUMMARY_FILE
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        if summary.get("run") != self._run_identity() or summary.get("steps") != self.total_steps:
            return None
        if self.dist.is_main:
            tqdm.write(f"{self.output_dir} already holds this run, finished at step {self.total_steps}: nothing "
                       "to do (--resume-from-checkpoint never trains it again; another --output-dir keeps this one)")
        plot = self.output_dir / "metrics.png"
        return TrainResult(self.output_dir, self.total_steps, summary["final_train"], summary.get("final_eval"),
                           self.output_dir / "metrics.jsonl", plot if plot.is_file() else None,
                           self.output_dir / FINAL_DIR, reference_model=summary.get("reference_model"),
                           eval_command=summary.get("eval_command"))

    def _train_step(self) -> Dict[str, float]:
        """One optimizer step over the global batch; this rank computes its share of each micro-batch.

        Each local loss is scaled by (local pairs / pairs in the step) * world size, so that the
        average DDP takes over ranks is the gradient of the step's mean loss over all its pairs.
        """
        cfg, world = self.cfg, self.dist.data_processes
        tick = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        records, weights, tokens = [], [], 0
        micro_batches = self._micro_batches(self.step)
        step_pairs = sum(_loss_weight(b) for b in micro_batches)
        for index, batch in enumerate(micro_batches):
            local = self.dist.shard(batch)
            # a rank with no pair of this micro-batch still joins DDP's all-reduce, with weight 0,
            # and records the placeholder's metrics with weight 0, so that every rank reduces the
            # same metric keys below
            pairs, share = (local, _loss_weight(local)) if local else (batch[:1], 0)
            last = index == len(micro_batches) - 1
            # FSDP2 reduce-scatters every micro-batch: skipping it would keep whole gradients
            ddp = self.dist.enabled and cfg.parallel == "ddp"
            sync = self.forward_model.no_sync() if (ddp and not last) else contextlib.nullcontext()
            with sync:
                loss, metrics, length = self._batch_loss(pairs, self.forward_model, counted=share > 0)
                (loss * (share / step_pairs * world)).backward()
            record = {"loss": loss.detach(), **metrics}  # read on the host once, after the step
            records.append(_per_label(record, pairs) if self.unpaired else record)
            weights.append(share)
            if share:
                tokens += length
        params = [p for p in self.policy.parameters() if p.requires_grad]
        clip = clip_grad_norm_for_tp if cfg.parallel == "tp" else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, cfg.max_grad_norm)
        if isinstance(grad_norm, DTensor):  # the norm over all shards, reduced by FSDP's mesh
            grad_norm = grad_norm.full_tensor()
        # the step's one synchronisation: its metrics come to the host, and with them any bad input
        # that the op and the loss flagged on the device is raised
        raise_pending_errors()
        *records, totals = _read_metrics(records + [{"grad_norm": grad_norm}])
        grad_norm = totals["grad_norm"]
        # NaN or inf in the gradients (a float16 overflow) skip the update, as a GradScaler skips it
        skipped = not math.isfinite(grad_norm)
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"{MAX_SKIPPED_IN_A_ROW} steps in a row up to step {self.step + 1} had NaN or inf gradients, so none "
                f"updated the model (dtype {self.cfg.dtype}; the steps' non_finite_logps are in the metrics): the "
                "model overflows or has diverged; train in bfloat16 or float32, or with a lower learning rate")
        if not skipped:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # the schedule goes on through a skipped update, as the data does (PyTorch warns of it)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        mean = self.dist.weighted_mean(records, weights, self.device)
        if self.unpaired:
            mean = _label_means(mean)
        tokens = world * self.dist.weighted_mean([{"tokens": tokens}], [1], self.device)["tokens"]
        elapsed = time.perf_counter() - tick
        return {"step": self.step, "split": "train", "epoch": self.step / self.steps_per_epoch, "lr": lr,
                "grad_norm": grad_norm, "skipped_updates": int(skipped), "tokens": int(tokens),
                "tokens_per_s": tokens / elapsed, **mean}

    def _gathered_state(self) -> Dict[str, torch.Tensor]:
        """Under FSDP2, the policy's whole trainable weights, on rank 0's CPU (empty elsewhere);
        every process must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.cfg.lora_r > 0)
        return get_model_state_dict(self.policy, options=options)

    def _save_final(self, target: Path, state: Optional[Dict[str, torch.Tensor]]) -> None:
        """The trained model as a plain Hugging Face model (and a LoRA run's adapter beside it).

        `state`: the gathered weights of a sharded policy (whose own tensors are shards); a LoRA
        adapter is then merged into its base model read back from disk, which training never changed.
        """
        model = self.policy
        if self.cfg.lora_r > 0:
            adapter = self.output_dir / "final-adapter"
            model.save_pretrained(adapter, state_dict=state)
            self.tokenizer.save_pretrained(adapter)
            if state is None:
                model = model.merge_and_unload()
            else:
                from peft import PeftModel
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(unwrap(model).name_or_path, local_files_only=True)
                with peft_internals_quiet():
                    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            state = None
        with transformers_progress_bars_off():
            model.save_pretrained(target, state_dict=state)
        self.tokenizer.save_pretrained(target)


def train(cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Run (or resume) a training job; Ctrl-C saves a checkpoint and raises with where it is."""
    return Trainer(cfg, on_step=on_step).run()
