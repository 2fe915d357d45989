"""The `fastpref train` and `fastpref eval` commands: flags, and what runs them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..loss_spec import LOSS_TYPES
from .checkpoint import CheckpointError
from .data import FORMATS, MALFORMED_POLICIES, TRUNCATION_MODES
from .loop import PARALLEL, SCHEDULES, TrainConfig, TrainingInterrupted, train

_DEFAULTS = TrainConfig()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. With no flags at all: the embedded default run."""
    add = parser.add_argument
    add("--model", help="local path of a transformers causal LM (default: the embedded tiny Llama)")
    add("--reference-model", help="local path of a separate frozen reference model "
        "(default: the policy's starting point, or its base model with LoRA)")
    add("--reference", choices=("cache", "online"), default=_DEFAULTS.reference,
        help="precompute reference log-probs once and cache them on disk, or compute them every step")
    add("--data", help="local JSONL/Parquet file or saved dataset directory (default: the bundled HH-RLHF sample)")
    add("--data-format", choices=FORMATS, default=_DEFAULTS.data_format)
    add("--split", help="split of a saved DatasetDict (default: train)")
    add("--output-dir", default=_DEFAULTS.output_dir)
    add("--loss-type", nargs="+", choices=LOSS_TYPES, default=[_DEFAULTS.loss_type],
        help="one loss type, or several for a weighted sum (e.g. sigmoid sft)")
    add("--loss-weights", nargs="+", type=float, help="one weight per --loss-type")
    add("--beta", type=float, help="inverse temperature (default: 0.1)")
    add("--label-smoothing", type=float, default=_DEFAULTS.label_smoothing)
    add("--simpo-gamma", type=float, default=_DEFAULTS.simpo_gamma)
    add("--average-logps", choices=("yes", "no"), help="override each loss type's sum/mean reduction")
    add("--learning-rate", "--lr", type=float, help="peak learning rate (default: 2e-3 for the embedded "
        "model, 5e-7 for a real one)")
    add("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    add("--warmup-ratio", type=float, default=_DEFAULTS.warmup_ratio)
    add("--lr-schedule", choices=SCHEDULES, default=_DEFAULTS.lr_schedule)
    add("--epochs", type=float)
    add("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    add("--pairs-per-step", type=int, help="pairs per micro-batch, over all processes")
    add("--grad-accum", type=int, default=_DEFAULTS.grad_accum, help="micro-batches per optimizer step")
    add("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm)
    add("--seed", type=int, default=_DEFAULTS.seed)
    add("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction)
    add("--eval-every", type=int)
    add("--save-every", type=int, default=_DEFAULTS.save_every)
    add("--keep-checkpoints", type=int, default=_DEFAULTS.keep_checkpoints)
    add("--max-length", type=int, help="longest prompt + response, in tokens")
    add("--max-prompt-length", type=int)
    add("--truncation-mode", choices=TRUNCATION_MODES, default=_DEFAULTS.truncation_mode,
        help="which end of an over-long prompt to keep")
    add("--on-malformed", choices=MALFORMED_POLICIES, default=_DEFAULTS.on_malformed)
    add("--prefix-sharing", action="store_true", help="compute each prompt once for its chosen and rejected")
    add("--gradient-checkpointing", action="store_true")
    add("--lora-r", type=int, default=_DEFAULTS.lora_r, help="LoRA rank (0: full fine-tune)")
    add("--lora-alpha", type=float, default=_DEFAULTS.lora_alpha)
    add("--lora-dropout", type=float, default=_DEFAULTS.lora_dropout)
    add("--lora-targets", nargs="+", help="module names to adapt (default: attention and MLP projections)")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=_DEFAULTS.dtype)
    add("--device", default=_DEFAULTS.device)
    add("--attention", default=_DEFAULTS.attention,
        help="auto, sdpa, eager, flex_attention or flash_attention_2")
    add("--cache-dir", help="where reference log-probs are cached (default: ~/.cache/fastpref)")
    add("--tensorboard", action="store_true")
    add("--resume", default=_DEFAULTS.resume, help="auto (latest checkpoint in --output-dir), never, or a path")
    add("--backend", default=_DEFAULTS.backend, help="fastpref backend: auto, triton, torch")
    add("--parallel", choices=PARALLEL, default=_DEFAULTS.parallel,
        help="with several processes (torchrun): ddp replicates the model on every process; fsdp "
             "shards parameters, gradients and optimizer state over them (FSDP2)")
    add("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    types = values["loss_type"]
    values["loss_type"] = types[0] if len(types) == 1 else types
    if args.average_logps is not None:
        values["average_logps"] = args.average_logps == "yes"
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    try:
        result = train(config_from_args(args))
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    except (ValueError, OSError, CheckpointError) as error:
        print(f"fastpref train: error: {error}", file=sys.stderr)
        return 2
    final = result.final_metrics
    print(f"done: {result.steps} steps; on the {final['pairs']} training pairs: reward accuracy "
          f"{final['rewards/accuracies']:.3f}, margin {final['rewards/margins']:.3f}, loss {final['loss']:.4f}")
    print(f"model: {result.model_path}\nmetrics: {result.metrics_path}\nplot: {result.plot_path}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", required=True, help="trained model directory (a LoRA adapter directory works too)")
    add("--reference-model", help="reference model directory (default for an adapter: its base model)")
    add("--data", help="preference file to score (default: the bundled HH-RLHF sample)")
    add("--data-format", choices=FORMATS, default="auto")
    add("--split")
    add("--beta", type=float, default=0.1)
    add("--output", help="write one JSON line per pair here (and the summary beside it)")
    add("--pairs-per-batch", type=int, default=8)
    add("--max-length", type=int, default=1024)
    add("--max-prompt-length", type=int, default=512)
    add("--truncation-mode", choices=TRUNCATION_MODES, default="keep_end")
    add("--on-malformed", choices=MALFORMED_POLICIES, default="skip")
    add("--device", default="auto")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    add("--attention", default="auto")
    add("--backend", default="auto")
    add("--no-progress", dest="progress", action="store_false")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_pairs

    try:
        summary = evaluate_pairs(
            args.model, args.data, reference_model=args.reference_model, beta=args.beta, output=args.output,
            pairs_per_batch=args.pairs_per_batch, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
            data_format=args.data_format, split=args.split, on_malformed=args.on_malformed, device=args.device,
            dtype=args.dtype, attention=args.attention, backend=args.backend, progress=args.progress)
    except (ValueError, OSError) as error:
        print(f"fastpref eval: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=1))
    return 0
