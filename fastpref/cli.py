"""Command-line interface: ``fastpref train``, ``eval``, ``bench``, ``plan`` and ``kernels``."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional

from . import __version__, bench
from .audit import command as audit_command
from .bench import plan as plan_module


def bench_main(op: str, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """``fastpref bench OP`` alone, for scripts that are only that benchmark."""
    parser = argparse.ArgumentParser(prog=prog, description=bench.__doc__.splitlines()[0])
    parsers = bench.add_arguments(parser)
    if argv is None:
        argv = sys.argv[1:]
    return bench.main(parser.parse_args([op, *argv]), parsers, _command(parser.prog, argv))


def main(argv: Optional[List[str]] = None) -> int:
    from .train import commands as train_commands

    parser = argparse.ArgumentParser(prog="fastpref", description="fastpref command-line tools")
    parser.add_argument("--version", action="version", version=f"fastpref {__version__}")
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
        "bench", help="time and peak memory vs the standard implementation and peers (no OP: all of them)",
        description=bench.__doc__.splitlines()[0], epilog="Each OP has its own flags: fastpref bench OP --help.")
    bench_parsers = bench.add_arguments(bench_parser)
    plan_parser = commands.add_parser(
        "plan", help="cost model of the LM-head step: every launch's FLOPs, bytes, atomics, predicted time",
        description=plan_module.__doc__.splitlines()[0])
    plan_module.add_arguments(plan_parser)
    kernels_parser = commands.add_parser(
        "kernels", help="compile every GPU kernel offline for sm_90/sm_80: registers, spills, smem, wgmma",
        description=audit_command.__doc__.splitlines()[0])
    audit_command.add_arguments(kernels_parser)
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.command in ("train", "eval"):
        args = train_commands.with_config_file(
            args, parser, train_parser if args.command == "train" else eval_parser, argv)
        # a run's console, redirected to a file, shows each line as it happens, not in blocks
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)
    if args.command == "train":
        return train_commands.run_train(args)
    if args.command == "eval":
        return train_commands.run_eval(args)
    if args.command == "plan":
        return plan_module.run(args)
    if args.command == "kernels":
        return audit_command.run(args, _command("fastpref", argv), argv[1:])
    return bench.main(args, bench_parsers, _command("fastpref", argv))


def _command(prog: str, argv: List[str]) -> str:
    """The command line as typed, for the report."""
    return " ".join([prog] + [shlex.quote(a) for a in argv])


if __name__ == "__main__":
    sys.exit(main())
