"""The `fastpref train` and `fastpref eval` commands: flags, and what runs them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from .checkpoint import CheckpointError
from .config import (EVAL_DEFAULTS, EVAL_FIELDS, EVAL_HELP, TrainConfig, add_config_arguments, config_from_args,
                     flag, read_config_file)
from .distributed import Distributed
from .loop import TrainingInterrupted, train
from .rounds import heldout_summary, run_rounds
from .wording import count_of


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless there is none to show or the text says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(action, argparse._StoreFalseAction)):
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
        message = re.sub(rf"(?<![-\w/.]){name}=(['\"]?)([^'\"\s,;)]*)\1", lambda m: f"{flag(name)} {m.group(2)}", message)
        message = re.sub(rf"(?<![-\w/.]){name}\b", flag(name), message)
    return message


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, generated from it (config.py). With no flags at all: the
    embedded default run."""
    _short_errors(parser)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="settings from a YAML file (the flags' names, e.g. output_dir: run); flags given "
                             "on the command line win")
    add_config_arguments(parser)


def with_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser,
                     subparser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """`args` parsed again with a --config file's settings as `subparser`'s defaults: the file sets
    what the command line leaves unsaid."""
    if args.config:
        try:
            values = read_config_file(args.config, subparser)
        except ValueError as error:
            subparser.error(str(error))
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    if args.command == "eval" and args.model is None:
        subparser.error("--model is required (on the command line or in the --config file)")
    return args


def run_train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if cfg.rounds:
            rounds = run_rounds(cfg)
            return _report_rounds(rounds) if Distributed.environment_rank() == 0 else 0
        result = train(cfg)
    except TrainingInterrupted as stop:
        if Distributed.environment_rank() == 0:  # every process stopped the same way
            print(stop, file=sys.stderr)
        return stop.exit_code
    except (ValueError, OSError, CheckpointError) as error:
        print(f"fastpref train: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2
    if Distributed.environment_rank() != 0:  # the main process reports the run
        return 0
    print(f"done: {count_of(result.steps, 'step')}")
    for split, note, metrics in (("held-out", " (never trained on)", result.eval_metrics),
                                 ("training", "", result.final_metrics)):
        if not metrics:
            continue
        if "examples" in metrics:  # unpaired (kto): rewards by label, and KTO's KL reference point
            print(f"  {count_of(metrics['examples'], split + ' example')}{note}: reward accuracy "
                  f"{metrics['rewards/accuracies']:.3f} (desirable reward > 0, undesirable < 0), reward "
                  f"{metrics['rewards/chosen']:.3f} desirable, {metrics['rewards/rejected']:.3f} undesirable, "
                  f"kl {metrics['kl']:.4f}, loss {metrics['loss']:.4f}")
        else:
            print(f"  {count_of(metrics['pairs'], split + ' pair')}{note}: reward accuracy "
                  f"{metrics['rewards/accuracies']:.3f}, margin {metrics['rewards/margins']:.3f}, "
                  f"loss {metrics['loss']:.4f}")
    print(f"model: {result.model_path}")
    if result.reference_model:  # a run finished by an older fastpref did not record it
        print(f"reference model: {result.reference_model}")
    print(f"metrics: {result.metrics_path}\nplot: {result.plot_path}")
    if result.eval_command:
        print(f"score the held-out pairs one by one: {result.eval_command}")
    return 0


def _report_rounds(result) -> int:
    print(f"done: {count_of(len(result.rounds) - 1, 'round')}; the judge's scores by round:")
    for record in result.rounds:
        print(f"  round {record['round']}: {heldout_summary(record)}"
              + (f", {count_of(record['pairs'], 'pair')} trained" if record["round"] else ""))
    print(f"model: {result.model_path}\nmetrics: {result.metrics_path}\nplot: {result.plot_path}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """`fastpref eval`'s flags: `fastpref train`'s own where they overlap (the same fields), and --output."""
    _short_errors(parser)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="settings from a YAML file (the flags' names); flags given on the command line win")
    # --model is required, but may come from the --config file: checked once that is read
    add_config_arguments(parser, EVAL_FIELDS, defaults=EVAL_DEFAULTS, helps=EVAL_HELP)
    parser.add_argument("--output", help="write one JSON line per pair here (and the summary beside it)")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_pairs

    try:
        summary = evaluate_pairs(
            args.model, args.data, reference_model=args.reference_model, beta=args.beta, output=args.output,
            pairs_per_step=args.pairs_per_step, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
            data_format=args.data_format, split=args.split, on_malformed=args.on_malformed, device=args.device,
            dtype=args.dtype, attention=args.attn_implementation, backend=args.backend, progress=args.progress,
            cache_dir=args.cache_dir)
    except (ValueError, OSError) as error:
        print(f"fastpref eval: error: {_in_flag_names(str(error))}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=1))
    return 0
