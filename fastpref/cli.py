"""Command-line interface: ``fastpref train``, ``fastpref eval``, ``fastpref bench``."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional

import torch

from . import backends as _backends
from . import bench


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags; shapes, dtype and repeats default per device (see bench.defaults)."""
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--op", choices=bench.OPS, default="logprobs",
                        help="logprobs: fastpref.linear_logprobs alone (default); preference: a whole "
                             "preference loss from TRL's padded batch, vs TRL and Liger-Kernel")
    parser.add_argument("--n", type=_positive_int, help="tokens N (rows of hidden; logprobs op)")
    parser.add_argument("--pairs", type=_positive_int, help="preference pairs B (2B padded rows; preference op)")
    parser.add_argument("--seq-len", type=_positive_int, help="padded sequence length T (preference op)")
    parser.add_argument("--loss", dest="losses", nargs="+", choices=bench.PREFERENCE_LOSSES,
                        help="preference losses to measure, each its own rows (default: all; preference op)")
    parser.add_argument("--hidden", type=_positive_int, help="hidden size H")
    parser.add_argument("--vocab", type=_positive_int, help="vocabulary size V")
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), help="dtype of hidden and weight")
    parser.add_argument("--backends", nargs="+", choices=_backends.registered_backends(),
                        help="fastpref backends to compare with the baseline (default: all that run on the device)")
    parser.add_argument("--head", choices=("trainable", "frozen", "both"), default="both",
                        help="LM head requires grad (trainable), not (frozen), or measure both (default)")
    parser.add_argument("--warmup", type=_positive_int,
                        help="untimed runs per method; the first is checked against a reference")
    parser.add_argument("--repeat", type=_positive_int, help="timed runs per method (median reported)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the report to this markdown file")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bench.Config:
    """Fill the per-device defaults and check the flags against the device; parser.error otherwise."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device}")

    flags_of_op = {"logprobs": {"--n": "n"}, "preference": {"--pairs": "pairs", "--seq-len": "seq_len", "--loss": "losses"}}
    for op, flags in flags_of_op.items():
        for flag, name in flags.items():
            if op != args.op and getattr(args, name) is not None:
                parser.error(f"{flag} is for --op {op}")
    chosen = bench.defaults(device, args.op)
    for name in chosen:
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    names = args.backends if args.backends is not None else _backends.available_backends(device)
    for name in names:
        try:
            _backends.resolve(name, device)
        except RuntimeError as exc:
            parser.error(f"--backends: {exc}")
    if args.op == "preference":
        if chosen["seq_len"] < 2:
            parser.error("--seq-len must be at least 2: a prompt token and a response token")
        shape = dict(n=2 * chosen["pairs"] * chosen["seq_len"], pairs=chosen["pairs"], seq_len=chosen["seq_len"],
                     losses=list(dict.fromkeys(args.losses or bench.PREFERENCE_LOSSES)))
    else:
        shape = dict(n=chosen["n"])
    return bench.Config(
        device=device,
        op=args.op,
        **shape,
        hidden=chosen["hidden"],
        vocab=chosen["vocab"],
        dtype=bench.DTYPES[chosen["dtype"]],
        backends=list(dict.fromkeys(names)),
        heads=bench.HEADS if args.head == "both" else (args.head,),
        warmup=chosen["warmup"],
        repeat=chosen["repeat"],
    )


def bench_main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run the benchmark from its flags alone (for scripts that are only the benchmark)."""
    parser = argparse.ArgumentParser(prog=prog, description=bench.__doc__.splitlines()[0])
    add_bench_arguments(parser)
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    return bench.run_and_report(config_from_args(args, parser), _command(parser.prog, argv), args.markdown)


def main(argv: Optional[List[str]] = None) -> int:
    from .train import commands as train_commands

    parser = argparse.ArgumentParser(prog="fastpref", description="fastpref command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train", help="align a causal LM on preference data (no arguments: the embedded default run)",
        description="Preference-optimisation training with fused losses. With no arguments: DPO on the "
                    "bundled HH-RLHF sample with a small random Llama, on the CPU, in a few minutes.")
    train_commands.add_train_arguments(train_parser)
    eval_parser = commands.add_parser(
        "eval", help="score a preference file: implicit rewards, reward accuracy, margins",
        description="Implicit rewards beta * log(pi / pi_ref) of every pair, with the fused op.")
    train_commands.add_eval_arguments(eval_parser)
    bench_parser = commands.add_parser(
        "bench", help="forward+backward time and peak memory vs the materialized baseline",
        description=bench.__doc__.splitlines()[0],
    )
    add_bench_arguments(bench_parser)
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_commands.run_train(args)
    if args.command == "eval":
        return train_commands.run_eval(args)
    return bench.run_and_report(config_from_args(args, bench_parser), _command("fastpref", argv), args.markdown)


def _command(prog: str, argv: List[str]) -> str:
    """The command line as typed, for the report."""
    return " ".join([prog] + [shlex.quote(a) for a in argv])


if __name__ == "__main__":
    sys.exit(main())
