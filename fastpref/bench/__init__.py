"""Benchmarks of fastpref against the standard implementation and the best peers.

Forward+backward time and peak memory, every method in the same process on the same inputs.

Ops (``fastpref bench OP``):
  logprobs     fastpref.linear_logprobs alone vs the materialized [N, V] logits and the peers'
               per-token heads (PyTorch's F.linear_cross_entropy, Liger's CuTe head, QuACK).
  outputs      what each per-token output (outputs=) and the soft cap add to the op's time.
  loss-head    DPO / IPO / SimPO from hidden states: materialized (TRL), TRL 1.16's head,
               Liger-Kernel, Cut Cross-Entropy, PyTorch's, Liger's CuTe and QuACK's heads and
               fastpref, over head shapes and batch sizes.
  end-to-end   one DPO step of a causal LM: TRL-style padded forward with full logits, the same
               with Liger-Kernel's loss, fastpref packed, fastpref packed with prefix sharing.
  all          each of them with its defaults for the device (the default).

Every method's first run is checked against a reference before anything is timed, so a fast
wrong answer never makes it into a table; running out of memory is a result ("OOM"), and so is
any other failure of one method ("ERROR: <type>: <message>"): the other methods' rows survive.
A method that cannot run here (a package, a GPU or a dtype it needs) is a row that says why,
"n/a (...)".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..progress import progress_bar
from . import end_to_end, logprobs, loss_head, outputs
from .measure import Progress
from .plots import NoPlot
from .report import MachineWatch, write_outputs

OPS = {module.NAME: module for module in (logprobs, outputs, loss_head, end_to_end)}
ALL = "all"
INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """One sub-command per op, plus "all"; returns the sub-parsers by op name."""
    subcommands = parser.add_subparsers(dest="op", metavar="OP",
                                        help=f"{', '.join(OPS)} or {ALL} (default: {ALL})")
    parsers = {}
    for name, op in OPS.items():
        parsers[name] = subcommands.add_parser(name, help=op.HELP, description=op.__doc__.splitlines()[0])
        op.add_arguments(parsers[name])
    parsers[ALL] = subcommands.add_parser(ALL, help="every op with its defaults for the device")
    _add_all_arguments(parsers[ALL])
    return parsers


def _add_all_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="write DIR/<device>-<op>.md (the report), .json (the machine and the raw rows) and"
                             " .png (time and peak memory per method) for every op")
    parser.add_argument("--no-plot", action="store_true", help="with --out-dir, skip the plots")


def main(args: argparse.Namespace, parsers: Dict[str, argparse.ArgumentParser], command: str,
         progress: bool = True) -> int:
    """Run the op the arguments name (all of them when none); 1 when a method gave a wrong
    answer or raised (its row says ERROR and the other methods are still measured), 130 when
    interrupted (the rows measured so far are reported and written)."""
    if args.op not in (None, ALL):
        cfg = OPS[args.op].config_from_args(args, parsers[args.op])
        return run_op(OPS[args.op], cfg, command, args.out, draw=not args.no_plot, progress=progress)
    status = 0
    for name, op in OPS.items():
        device, out_dir = getattr(args, "device", None), getattr(args, "out_dir", None)
        op_args = parsers[name].parse_args(["--device", device] if device else [])
        cfg = op.config_from_args(op_args, parsers[name])
        out = str(Path(out_dir) / f"{cfg.device.type}-{name}") if out_dir else None
        draw = not getattr(args, "no_plot", False)
        status = max(status, run_op(op, cfg, command, out, draw=draw, progress=progress))
        if status == INTERRUPTED:
            break
    return status


def run_op(op, cfg, command: str, out: Optional[str] = None, draw: bool = True, progress: bool = True) -> int:
    """Run one op, print its report and write its files; see main for the exit status. On a CPU
    a busy machine is warned of on stderr, before and after the measurement."""
    rows: List = []
    watch = MachineWatch()
    if cfg.device.type == "cpu" and watch.at_start.warning():
        print(f"warning: {watch.at_start.warning()} Measuring anyway.", file=sys.stderr)
    interrupted = False
    with progress_bar(op.NAME, op.planned_work(cfg), enabled=progress) as bar:
        try:
            op.run(cfg, rows, Progress(lambda step: bar.set_description_str(f"{op.NAME}: {step}", refresh=True),
                                       bar.update))
        except KeyboardInterrupt:
            interrupted = True
    machine = watch.finish()
    report = op.format_report(rows, cfg, command, machine)
    if interrupted:
        report += "\n**Interrupted**: the run was stopped; these are the rows measured before that.\n"
    print(report)
    if cfg.device.type == "cpu" and machine.warning():
        print(f"warning: {machine.warning()}", file=sys.stderr)

    def draw_plot(path: Path) -> bool:
        try:
            op.plot(rows, cfg, path)
        except NoPlot as reason:
            print(f"no {path}: {reason}", file=sys.stderr)
            return False
        return True

    written = write_outputs(out, report, rows, machine, draw_plot if draw else None)
    if written:
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    failed = op.failures(rows)
    for row in failed:
        print(f"failed (not timed): {row}", file=sys.stderr)
    if interrupted:
        return INTERRUPTED
    return 1 if failed else 0


__all__ = ["OPS", "add_arguments", "main", "run_op"]
