"""``fastpref plan --memory 24GiB``: before any work, which micro-batch, gradient checkpointing,
LoRA or QLoRA and ZeRO stage fit a per-GPU memory budget, on how many GPUs.

The model's sizes come from its config (the model is built on the meta device: no weights are
read) and the micro-batches from the data's real lengths, tokenized and cut as ``fastpref train``
cuts them: a micro-batch of m pairs is the data's m longest. Each setting's peak per GPU is
:func:`fastpref.train.memory.estimate_memory`'s, for a GPU run in bfloat16 with attention that
stores no [T x T] matrix (flash or flex, what ``fastpref train`` picks on a GPU), the reference's
log-probs cached (full fine-tuning) or the model with its adapter disabled (LoRA, QLoRA).

Settings: full fine-tuning, LoRA, QLoRA 4-bit and 8-bit (``--load-in-4bit``, ``--load-in-8bit``);
each on one GPU or under DDP (every GPU holds everything), under ZeRO-2 (gradients and optimizer
state shared out: DeepSpeed through ``FastprefDPOTrainer``) or ZeRO-3 (the parameters too:
DeepSpeed, or ``fastpref train --parallel fsdp``) on 2, 4 or 8 GPUs; with and without gradient
checkpointing. QLoRA is planned without sharding (its quantized weights are not sharded by
fastpref's FSDP2). The estimates were checked against measured peak memory on the CPU (see
:mod:`fastpref.train.memory`).
"""
from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .memory import (ADAPTATIONS, GIB, MemoryEstimate, MemorySetting, ModelShape, estimate_memory,
                     longest_micro_batch, packed_tokens)

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
GPU_COUNTS = (2, 4, 8)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
ADAPTATION_FLAGS = {"full": "", "lora": "--lora-r {r}", "qlora-4bit": "--lora-r {r} --load-in-4bit",
                    "qlora-8bit": "--lora-r {r} --load-in-8bit"}


def parse_size(text: str, flag: str = "--memory") -> int:
    """Bytes of a size such as "24GiB", "80GB", "24g" (GiB, MiB, ...: powers of 1024; GB, MB, ...: of 1000)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{flag} must be a positive size such as 24GiB, 80GB or 16000MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Fit:
    """The largest micro-batch (in pairs) of one setting that fits, with its estimate; None: not even 1."""

    setting: MemorySetting
    pairs: Optional[int]
    estimate: Optional[MemoryEstimate]
    smallest: MemoryEstimate  # the estimate of a micro-batch of 1


def settings(gpu_counts: Sequence[int] = GPU_COUNTS, **common) -> List[MemorySetting]:
    """Every setting the plan weighs (see the module documentation)."""
    planned = []
    for adaptation in ADAPTATIONS:
        shardings = [("none", 1)]
        if not adaptation.startswith("qlora"):
            shardings += [(sharding, gpus) for sharding in ("zero2", "zero3") for gpus in gpu_counts]
        for sharding, gpus in shardings:
            for checkpointing in (False, True):
                planned.append(MemorySetting(adaptation=adaptation, gradient_checkpointing=checkpointing,
                                             sharding=sharding, processes=gpus, **common))
    return planned


def fits(shape: ModelShape, items, budget: int, planned: Sequence[MemorySetting], *, prefix_sharing: bool = False,
         micro_batches: Sequence[int] = MICRO_BATCHES) -> List[Fit]:
    """For each setting, the largest micro-batch of `items` (tokenized pairs) whose peak fits `budget`."""
    sizes = [size for size in micro_batches if size <= len(items)] or [len(items)]
    batches = {size: longest_micro_batch(items, size, prefix_sharing) for size in sizes}
    found = []
    for setting in planned:
        best = None
        for size in sizes:
            tokens, scored = batches[size]
            estimate = estimate_memory(shape, setting, tokens=tokens, scored_tokens=scored)
            if estimate.peak > budget:
                break
            best = (size, estimate)
        tokens, scored = batches[sizes[0]]
        smallest = estimate_memory(shape, setting, tokens=tokens, scored_tokens=scored)
        found.append(Fit(setting, *(best or (None, None)), smallest=smallest))
    return found


def _gib(size: float) -> str:
    return f"{size / GIB:.1f}"


def _where(setting: MemorySetting) -> str:
    if setting.sharding == "none":
        return "1 GPU (or DDP)"
    return f"{setting.processes} GPUs, ZeRO-{setting.sharding[-1]}"


def format_plan(shape: ModelShape, items, budget: int, found: Sequence[Fit], *, model: Optional[str],
                data: Optional[str], lora_r: int, prefix_sharing: bool) -> str:
    """The plan as Markdown: the table of every setting, then the fewest GPUs for each adaptation
    with its ``fastpref train`` command (`model`, `data`: as given, None for the defaults)."""
    lengths = [packed_tokens(item, prefix_sharing) for item in items]
    lines = [
        f"# Memory plan: {model or 'the embedded tiny Llama'} on {data or 'the bundled HH-RLHF sample'}, "
        f"{budget / GIB:.1f} GiB per GPU",
        "",
        f"- model: {shape.parameters / 1e6:,.1f}M parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"vocabulary {shape.vocab:,}{' (tied to the embeddings)' if shape.tied else ''}",
        f"- data: {len(items):,} pairs, {statistics.median(lengths):,.0f} tokens per pair in the packed forward "
        f"(median; longest {max(lengths):,}); a micro-batch of m pairs is the data's m longest",
        "- estimates for bfloat16 on GPUs, attention without a [T x T] matrix (flash, flex), AdamW, the "
        f"reference cached (full) or the adapter disabled (LoRA r {lora_r}, QLoRA); peak per GPU in GiB",
        "",
        "| model weights | GPUs | largest micro-batch (peak) | with gradient checkpointing | peak at 1 pair |",
        "|---|---|---|---|---|",
    ]
    by_row = {}
    for fit in found:
        key = (fit.setting.adaptation, fit.setting.sharding, fit.setting.processes)
        by_row.setdefault(key, {})[fit.setting.gradient_checkpointing] = fit

    def cell(fit: Fit) -> str:
        return "does not fit" if fit.pairs is None else f"{fit.pairs} ({_gib(fit.estimate.peak)})"

    for (adaptation, _, _), row in by_row.items():
        plain, checkpointed = row[False], row[True]
        lines.append(f"| {adaptation} | {_where(plain.setting)} | {cell(plain)} | {cell(checkpointed)} | "
                     f"{_gib(plain.smallest.peak)} / {_gib(checkpointed.smallest.peak)} |")
    lines += ["", "Fewest GPUs for each (the largest micro-batch there, and how to launch it):"]
    for adaptation in ADAPTATIONS:
        candidates = [fit for fit in found if fit.setting.adaptation == adaptation and fit.pairs is not None]
        if adaptation.startswith("qlora") and model is None:
            lines.append(f"- {adaptation}: quantizes a model as it is loaded: give --model")
            continue
        if not candidates:
            lines.append(f"- {adaptation}: does not fit {max(GPU_COUNTS)} GPUs")
            continue
        best = min(candidates, key=lambda fit: (fit.setting.processes, fit.setting.gradient_checkpointing,
                                                fit.setting.sharding, -fit.pairs))
        lines.append(f"- {adaptation}: {_where(best.setting)}, {best.pairs} pairs per GPU per micro-batch, "
                     f"peak {_gib(best.estimate.peak)} GiB: "
                     f"{launch_command(best, model, data, lora_r, prefix_sharing)}")
    return "\n".join(lines)


def launch_command(fit: Fit, model: Optional[str], data: Optional[str], lora_r: int, prefix_sharing: bool) -> str:
    """How to launch a setting: ``fastpref train`` (one GPU, or FSDP2 for ZeRO-3), or the TRL drop-in
    under DeepSpeed for ZeRO-2."""
    setting = fit.setting
    if setting.sharding == "zero2":
        checkpointing = ", gradient_checkpointing=True" if setting.gradient_checkpointing else ""
        return (f"DeepSpeed ZeRO-2 through `FastprefDPOTrainer` (`accelerate launch --config_file zero2.yaml`, "
                f"`per_device_train_batch_size={fit.pairs}`{checkpointing})")
    flags = [f"--model {model}" if model else "", f"--data {data}" if data else "",
             ADAPTATION_FLAGS[setting.adaptation].format(r=lora_r), f"--pairs-per-step {fit.pairs * setting.processes}",
             "--prefix-sharing" if prefix_sharing else "",
             "--gradient-checkpointing" if setting.gradient_checkpointing else "",
             "--parallel fsdp" if setting.sharding == "zero3" else ""]
    launch = f"torchrun --nproc-per-node {setting.processes} -m fastpref.cli train" if setting.processes > 1 else \
        "fastpref train"
    return f"`{launch} {' '.join(flag for flag in flags if flag)}`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory plan (--memory)")
    group.add_argument("--memory", metavar="SIZE",
                       help="plan training in this much memory per GPU (24GiB, 80GB, ...): which micro-batch, "
                            "gradient checkpointing, LoRA/QLoRA and ZeRO stage fit, on how many GPUs, from --model's "
                            "config and --data's lengths; nothing else is computed")
    group.add_argument("--model", help="model folder or packaged name (default: the embedded tiny Llama)")
    group.add_argument("--data", help="preference data, as fastpref train takes it (default: the bundled sample)")
    group.add_argument("--max-length", type=int, default=None, help="as fastpref train's (default: its preset)")
    group.add_argument("--max-prompt-length", type=int, default=None, help="as fastpref train's (default: its preset)")
    group.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA and QLoRA rows (default: 16)")
    group.add_argument("--prefix-sharing", action="store_true", help="each prompt computed once for its pair")


def planned_data(model: Optional[str], data: Optional[str], **train_options):
    """(config, tokenizer, tokenized pairs) of a ``fastpref train`` run on `model` and `data` with
    `train_options`: its data, cut as that run cuts it."""
    from . import data as data_module
    from .config import TrainConfig
    from .loop import load_tokenizer, with_local_models

    cfg = with_local_models(TrainConfig(model=model, data=data, **train_options).resolved())
    tokenizer = load_tokenizer(cfg)
    rows = data_module.load_rows(cfg.data, split=cfg.split)
    items, report = data_module.tokenize_pairs(rows, tokenizer, max_length=cfg.max_length,
                                               max_prompt_length=cfg.max_prompt_length,
                                               truncation_mode=cfg.truncation_mode, on_malformed=cfg.on_malformed,
                                               format=cfg.data_format)
    if not items:
        raise ValueError("no usable preference pairs in the data:\n" + report.summary())
    return cfg, tokenizer, items


def model_shape(model: Optional[str], tokenizer) -> ModelShape:
    """The shape of a model folder's config, or of the embedded model (`model` None)."""
    from transformers import AutoConfig

    from .default_assets import default_model_config

    if model is None:
        config = default_model_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    return ModelShape.from_config(config)


def run(args: argparse.Namespace) -> int:
    budget = parse_size(args.memory)
    if args.lora_r < 1:
        raise ValueError(f"--lora-r must be >= 1, got {args.lora_r}")
    cfg, tokenizer, items = planned_data(args.model, args.data, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length, prefix_sharing=args.prefix_sharing)
    shape = model_shape(cfg.model, tokenizer)
    found = fits(shape, items, budget, settings(lora_r=args.lora_r), prefix_sharing=cfg.prefix_sharing)
    print(format_plan(shape, items, budget, found, model=args.model, data=args.data, lora_r=args.lora_r,
                      prefix_sharing=cfg.prefix_sharing))
    return 0
