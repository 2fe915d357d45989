"""The `fastpref train` and `fastpref eval` commands: flags, and what runs them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from ..loss_spec import LOSS_TYPES
from .checkpoint import CheckpointError
from .data import FORMATS, MALFORMED_POLICIES, TRUNCATION_MODES
from .loop import PARALLEL, SCHEDULES, TrainConfig, TrainingInterrupted, train
from .named_models import NAMED_MODELS

_DEFAULTS = TrainConfig()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless there is none to show or the text says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"


def _short_errors(parser: argparse.ArgumentParser) -> None:
    """A bad flag gets one line naming it and a pointer to --help, not the whole usage."""
    parser.formatter_class = _HelpWithDefaults

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n(all flags: {parser.prog} --help)\n")

    parser.error = error


def _in_flag_names(message: str) -> str:
    """An error message of the Python API as the command line reads it: on_malformed='skip' becomes
    --on-malformed skip, and every other TrainConfig field name its flag."""
    for name in sorted((f.name for f in dataclasses.fields(TrainConfig) if "_" in f.name), key=len, reverse=True):
        message = re.sub(rf"(?<![-\w/.]){name}=(['\"]?)([^'\"\s,;)]*)\1", lambda m: f"{_flag(name)} {m.group(2)}", message)
        message = re.sub(rf"(?<![-\w/.]){name}\b", _flag(name), message)
    return message


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (TRL's name too where TRL has one). With no flags at all: the
    embedded default run."""
    _short_errors(parser)
    add = parser.add_argument
    add("--model", help="local folder of a transformers causal LM, or a packaged model by name: "
        f"{', '.join(NAMED_MODELS)} (default: the embedded tiny Llama)")
    add("--reference-model", help="local folder (or packaged name) of a separate frozen reference model "
        "(default: the policy's starting point, or its base model with LoRA)")
    add("--reference", choices=("cache", "online"), default=_DEFAULTS.reference,
        help="precompute reference log-probs once and cache them on disk, or compute them every step")
    add("--data", help="local JSONL/Parquet file or saved dataset directory (default: the bundled HH-RLHF sample)")
    add("--data-format", choices=("auto",) + FORMATS, default=_DEFAULTS.data_format,
        help="how rows hold prompt and responses; auto: from the columns")
    add("--split", help="split of a saved DatasetDict (default: train)")
    add("--output-dir", default=_DEFAULTS.output_dir, help="where metrics, checkpoints and the model go")
    add("--loss-type", nargs="+", choices=LOSS_TYPES, default=[_DEFAULTS.loss_type],
        metavar="TYPE", help=f"one loss type, or several for a weighted sum (e.g. sigmoid sft); one of "
        f"{', '.join(LOSS_TYPES)}")
    add("--loss-weights", nargs="+", type=float, help="one weight per --loss-type (default: 1 each)")
    add("--beta", type=float, help="inverse temperature (default: 0.1)")
    add("--label-smoothing", type=float, default=_DEFAULTS.label_smoothing,
        help="assumed fraction of flipped preference labels (robust/sigmoid)")
    add("--simpo-gamma", type=float, default=_DEFAULTS.simpo_gamma, help="SimPO's target reward margin")
    add("--average-logps", choices=("yes", "no"),
        help="override each loss type's sum/mean reduction (default: the loss type's own)")
    add("--learning-rate", "--lr", type=float, help="peak learning rate (default: 2e-3 for the embedded "
        "model, 5e-7 for a real one)")
    add("--weight-decay", type=float, default=_DEFAULTS.weight_decay, help="AdamW weight decay")
    add("--warmup-ratio", type=float, default=_DEFAULTS.warmup_ratio,
        help="fraction of the steps with a linear warmup (ceil(ratio * steps) steps, as TRL)")
    add("--lr-schedule", "--lr-scheduler-type", choices=SCHEDULES, default=_DEFAULTS.lr_schedule,
        help="learning-rate decay after the warmup")
    add("--epochs", "--num-train-epochs", type=float,
        help="passes over the training pairs (default: 4 for the embedded model, 1 for a real one)")
    add("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    add("--pairs-per-step", type=int,
        help="pairs per micro-batch, over all processes (default: 8)")
    add("--per-device-train-batch-size", type=int, dest="per_device_pairs",
        help="TRL's name: pairs per micro-batch per process (= --pairs-per-step / processes)")
    add("--grad-accum", "--gradient-accumulation-steps", type=int, default=_DEFAULTS.grad_accum,
        help="micro-batches per optimizer step")
    add("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm, help="gradient clipping norm")
    add("--seed", type=int, default=_DEFAULTS.seed, help="seed of the data order, split and initialisation")
    add("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction,
        help="fraction of the pairs held out (never trained on) for evaluation")
    add("--eval-every", "--eval-steps", type=int,
        help="evaluate on the held-out pairs every N steps (default: 40 embedded, 100 real)")
    add("--save-every", "--save-steps", type=int, default=_DEFAULTS.save_every, help="checkpoint every N steps")
    add("--keep-checkpoints", "--save-total-limit", type=int, default=_DEFAULTS.keep_checkpoints,
        help="checkpoints kept (older ones are deleted)")
    add("--max-length", type=int, help="longest prompt + response, in tokens (default: 160 embedded, 1024 real)")
    add("--max-prompt-length", type=int, help="longest prompt, in tokens (default: 96 embedded, 512 real)")
    add("--truncation-mode", choices=TRUNCATION_MODES, default=_DEFAULTS.truncation_mode,
        help="which end of an over-long prompt to keep")
    add("--on-malformed", choices=MALFORMED_POLICIES, default=_DEFAULTS.on_malformed,
        help="skip (and report) rows that cannot be split into prompt and responses, or stop at them")
    add("--prefix-sharing", action="store_true", help="compute each prompt once for its chosen and rejected")
    add("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    add("--lora-r", type=int, default=_DEFAULTS.lora_r,
        help="LoRA rank (0: full fine-tune; > 0 needs pip install 'fastpref[lora]')")
    add("--lora-alpha", type=float, default=_DEFAULTS.lora_alpha, help="LoRA scaling numerator")
    add("--lora-dropout", type=float, default=_DEFAULTS.lora_dropout, help="LoRA dropout")
    add("--lora-targets", nargs="+", help="module names to adapt (default: attention and MLP projections)")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=_DEFAULTS.dtype,
        help="model dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    add("--device", default=_DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    add("--attention", default=_DEFAULTS.attention,
        help="auto, sdpa, eager, flex_attention or flash_attention_2")
    add("--cache-dir", help="where reference log-probs and converted packaged models are cached "
        "(default: ~/.cache/fastpref)")
    add("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard")
    add("--resume", "--resume-from-checkpoint", default=_DEFAULTS.resume,
        help="auto (latest checkpoint in --output-dir), never, or a checkpoint path")
    add("--backend", default=_DEFAULTS.backend, help="fastpref backend: auto, triton, torch")
    add("--parallel", choices=PARALLEL, default=_DEFAULTS.parallel,
        help="with several processes (torchrun): ddp replicates the model on every process; fsdp "
             "shards parameters, gradients and optimizer state over them (FSDP2)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bars (the data report and warnings are still shown)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    types = values["loss_type"]
    values["loss_type"] = types[0] if len(types) == 1 else types
    if args.average_logps is not None:
        values["average_logps"] = args.average_logps == "yes"
    if args.per_device_pairs is not None:
        if args.pairs_per_step is not None:
            raise ValueError("give --pairs-per-step or --per-device-train-batch-size, not both")
        values["pairs_per_step"] = args.per_device_pairs * int(os.environ.get("WORLD_SIZE", "1"))
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    try:
        result = train(config_from_args(args))
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    except (ValueError, OSError, CheckpointError) as error:
        print(f"fastpref train: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2
    print(f"done: {result.steps} steps")
    for split, metrics in (("held-out pairs (never trained on)", result.eval_metrics),
                           ("training pairs", result.final_metrics)):
        if metrics:
            print(f"  {metrics['pairs']} {split}: reward accuracy {metrics['rewards/accuracies']:.3f}, "
                  f"margin {metrics['rewards/margins']:.3f}, loss {metrics['loss']:.4f}")
    print(f"model: {result.model_path}\nmetrics: {result.metrics_path}\nplot: {result.plot_path}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """`fastpref eval`'s flags: the names and meanings of `fastpref train`'s where they overlap."""
    _short_errors(parser)
    add = parser.add_argument
    add("--model", required=True, help="trained model folder (a LoRA adapter folder works too)")
    add("--reference-model", help="reference model folder (default for an adapter: its base model)")
    add("--data", help="preference file to score, e.g. OUTPUT_DIR/heldout.jsonl of a training run "
        "(default: the bundled HH-RLHF sample)")
    add("--data-format", choices=("auto",) + FORMATS, default=_DEFAULTS.data_format,
        help="how rows hold prompt and responses; auto: from the columns")
    add("--split", help="split of a saved DatasetDict (default: train)")
    add("--beta", type=float, default=0.1, help="inverse temperature of the implicit rewards")
    add("--output", help="write one JSON line per pair here (and the summary beside it)")
    add("--pairs-per-step", type=int, default=8, help="pairs per forward pass")
    add("--max-length", type=int, default=1024,
        help="longest prompt + response, in tokens: use the training run's value")
    add("--max-prompt-length", type=int, default=512, help="longest prompt, in tokens: use the training run's value")
    add("--truncation-mode", choices=TRUNCATION_MODES, default=_DEFAULTS.truncation_mode,
        help="which end of an over-long prompt to keep")
    add("--on-malformed", choices=MALFORMED_POLICIES, default=_DEFAULTS.on_malformed,
        help="skip (and report) rows that cannot be split into prompt and responses, or stop at them")
    add("--device", default=_DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=_DEFAULTS.dtype,
        help="model dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    add("--attention", default=_DEFAULTS.attention, help="auto, sdpa, eager, flex_attention or flash_attention_2")
    add("--backend", default=_DEFAULTS.backend, help="fastpref backend: auto, triton, torch")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_pairs

    try:
        summary = evaluate_pairs(
            args.model, args.data, reference_model=args.reference_model, beta=args.beta, output=args.output,
            pairs_per_step=args.pairs_per_step, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
            data_format=args.data_format, split=args.split, on_malformed=args.on_malformed, device=args.device,
            dtype=args.dtype, attention=args.attention, backend=args.backend, progress=args.progress)
    except (ValueError, OSError) as error:
        print(f"fastpref eval: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=1))
    return 0
