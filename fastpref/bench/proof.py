"""The GPU proof run: the numbers that matter from one short GPU lease, most important first.

Run through ``benchmarks/gpu_proof.sh`` (which installs fastpref and the carried wheels first) or
as ``python -m fastpref.bench.proof``. Steps, in order, each in its own process under its own
time limit, each writing its files before the next starts:

  gpu-tests     the tests marked gpu: the op and the losses on every backend against float64
                references
  device-peaks  this device's bf16 matmul rate and copy bandwidth, the ceilings the rest is read against
  logprobs      fastpref.linear_logprobs at N=16,384 H=4,096 V=128,256 bf16, trainable and frozen head,
                every backend against the materialized logits and the peers' per-token heads (PyTorch's
                F.linear_cross_entropy, Liger's CuTe head, QuACK, QuACK's chunked head): time, TFLOP/s
                against 8NHV/4NHV, peak memory
  loss-head     the DPO loss from hidden states at the same head shape against materialized, TRL 1.16's
                chunked head, Liger-Kernel, Cut Cross-Entropy, PyTorch's, Liger's CuTe and QuACK's heads
  end-to-end    one DPO step of a 1B-class Llama, if time is left

A step that runs past its limit is interrupted (SIGINT: the benchmarks write the rows measured so
far) and the next one starts; the whole run keeps to --budget-s seconds from --started (the
install counts). ``--dry-run`` runs the same plumbing on a CPU with tiny shapes and the torch
backend, so CI tests it. The summary, proof.md, quotes each step's status and the headline rows
against the measured matmul peak, each beside the cost model's prediction for its design. A peer
that cannot run there is a row that says why (the machine's torch 2.11 has no
F.linear_cross_entropy; the CuTe DSL that Liger's CuTe head and QuACK need is not carried, see
benchmarks/gpu-wheels.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from .device_peaks import format_peaks, load_peaks
from .report import markdown_table, number, utc_now, versions

HEADLINE = dict(n=16384, hidden=4096, vocab=128256)
GRACE_S = 45  # after SIGINT, for a benchmark to write the rows it has


@dataclass
class Step:
    name: str
    limit_s: float
    command: List[str]
    status: str = "not run"
    wall_s: Optional[float] = None
    files: List[str] = field(default_factory=list)


def _fastpref(*argv: str) -> List[str]:
    return [sys.executable, "-m", "fastpref.cli", *argv]


def gpu_steps(results: Path) -> List[Step]:
    shape = ["--hidden", str(HEADLINE["hidden"]), "--vocab", str(HEADLINE["vocab"])]
    return [
        Step("gpu-tests", 150, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "--continue-on-collection-errors", "tests/"]),
        Step("device-peaks", 45, [sys.executable, "-m", "fastpref.bench.device_peaks",
                                  "--out", str(results / "device-peaks")]),
        Step("logprobs", 120, _fastpref("bench", "logprobs", "--n", str(HEADLINE["n"]), *shape,
                                        "--dtype", "bfloat16", "--warmup", "2", "--repeat", "10",
                                        "--out", str(results / "logprobs"))),
        Step("loss-head", 150, _fastpref("bench", "loss-head", *shape, "--tokens", str(HEADLINE["n"]),
                                         "--seq-len", "1024", "--loss", "sigmoid", "--dtype", "bfloat16",
                                         "--warmup", "2", "--repeat", "5", "--out", str(results / "loss-head"))),
        Step("end-to-end", 240, _fastpref("bench", "end-to-end", "--model", "llama-1b", "--seq-len", "1024",
                                          "--pairs", "4", "--no-max-pairs", "--repeat", "3",
                                          "--out", str(results / "end-to-end"))),
    ]


def dry_run_steps(results: Path) -> List[Step]:
    """The same steps on a CPU: tiny shapes, the torch backend, one timed run."""
    cpu = ["--device", "cpu", "--dtype", "float32", "--warmup", "1", "--repeat", "1"]
    return [
        Step("gpu-tests", 120, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "tests/test_linear_logprobs_gpu.py"]),
        Step("device-peaks", 60, [sys.executable, "-m", "fastpref.bench.device_peaks", "--device", "cpu",
                                  "--size", "256", "--copy-mib", "16", "--out", str(results / "device-peaks")]),
        Step("logprobs", 120, _fastpref("bench", "logprobs", "--n", "64", "--hidden", "32", "--vocab", "500",
                                        "--backends", "torch", *cpu, "--out", str(results / "logprobs"))),
        Step("loss-head", 120, _fastpref("bench", "loss-head", "--hidden", "16", "--vocab", "300", "--tokens", "96",
                                         "--seq-len", "24", "--backends", "torch", "--peers", "materialized",
                                         *cpu, "--out", str(results / "loss-head"))),
        Step("end-to-end", 180, _fastpref("bench", "end-to-end", "--model", "llama-tiny", "--seq-len", "16",
                                          "--pairs", "1", "--no-max-pairs", "--methods", "trl-padded",
                                          "fastpref-packed", *cpu, "--out", str(results / "end-to-end"))),
    ]


def _interruptible() -> None:
    """In the step's process before it starts: SIGINT back to its default, so that a Python step
    turns it into KeyboardInterrupt and keeps its rows even when the proof runs in the background
    (`nohup ... &`), whose jobs a shell starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(step: Step, limit_s: float, log: Path) -> None:
    """Run `step` with its output in `log`; past `limit_s` it is interrupted, then killed."""
    began = time.monotonic()
    with open(log, "w") as output:
        process = subprocess.Popen(step.command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=_interruptible)
        try:
            code = process.wait(timeout=limit_s)
            step.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
                step.status = f"cut at its {limit_s:.0f} s limit (interrupted; rows measured so far kept)"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                step.status = f"killed after its {limit_s:.0f} s limit and {GRACE_S} s of grace"
    step.wall_s = time.monotonic() - began


def device_kind(device: str) -> Optional[str]:
    """The cost model's kind for a device name ("NVIDIA H200 (driver ...)" -> "h200")."""
    from .plan import DEVICE_KINDS

    return next((kind for kind in DEVICE_KINDS if kind in device.lower()), None)


# The cost model's design of each GPU backend (both heads) and of each peer whose design
# `fastpref plan --calibrate` counts (trainable head: the one their figures are published for).
DESIGN_OF_METHOD = {"fastpref-triton": "slab", "fastpref-cuda": "cuda", "fastpref-cuda-in-forward": "groups"}
PEER_DESIGN_OF_METHOD = {"liger-cute": "liger-cute", "quack-chunked": "quack", "torch-native": "torch-native",
                         "trl": "trl"}


def predicted(row: dict, kind: Optional[str]) -> str:
    """The cost model's estimate in ms for a row whose design it counts, else "-"."""
    from .calibration import DESIGNS, predicted_ms
    from .plan import Shape, plan

    if kind is None or row.get("dtype") not in ("bfloat16", "float16"):
        return "-"
    shape = Shape(row["scored"], row["hidden"], row["vocab"])
    if row["method"] in DESIGN_OF_METHOD:
        return f"{plan(shape, row['head'], DESIGN_OF_METHOD[row['method']], kind).predicted_ms:.0f}"
    design = PEER_DESIGN_OF_METHOD.get(row["method"])
    if design is None or row["head"] != "trainable":
        return "-"
    return f"{predicted_ms(DESIGNS[design](shape), kind):.0f}"


def headline_rows(results: Path, peak_tflops: Optional[float], kind: Optional[str] = None) -> List[List[str]]:
    """Every measured row of the logprobs and loss-head steps: time (and the cost model's
    prediction), TFLOP/s, share of the measured matmul peak, peak memory."""
    cells = []
    for op in ("logprobs", "loss-head"):
        try:
            rows = json.loads((results / f"{op}.json").read_text())["rows"]
        except (OSError, ValueError):
            continue
        for row in rows:
            rate = row.get("tflops")
            share = f"{100 * rate / peak_tflops:.0f}%" if rate and peak_tflops else "-"
            cells.append([op, row["method"], row["head"], row["status"], number(row.get("time_ms")),
                          predicted(row, kind), number(rate, 2), share, number(row.get("peak_mib"))])
    return cells


def summary(steps: Sequence[Step], results: Path, command: str, device: str, dry_run: bool) -> str:
    peaks = load_peaks(results / "device-peaks.json")
    lines = [f"# GPU proof run{' (dry run on the CPU)' if dry_run else ''}", "", f"- device: {device}",
             f"- {versions()}", f"- command: `{command}`", f"- date: {utc_now()}", "",
             markdown_table(["step", "status", "wall (s)", "limit (s)", "files"],
                            [[s.name, s.status, number(s.wall_s), f"{s.limit_s:.0f}", ", ".join(s.files)]
                             for s in steps]), ""]
    if peaks is not None:
        lines += ["## Device ceilings (this run)", "", format_peaks(peaks), ""]
    cells = headline_rows(results, peaks.matmul_tflops if peaks else None, device_kind(device))
    if cells:
        lines += ["## Headline rows", "",
                  "TFLOP/s against the FLOP floor (8 N_scored H V trainable, 4 N_scored H V frozen); "
                  "share = TFLOP/s over this run's measured matmul rate; predicted = the cost model's estimate "
                  "for the row's design on this kind of GPU (`fastpref plan`, `fastpref plan --calibrate`; a model "
                  "estimate, not a measurement).", "",
                  markdown_table(["op", "method", "head", "status", "time (ms)", "predicted (ms)", "TFLOP/s",
                                  "of matmul peak", "peak memory (MiB)"], cells), ""]
    return "\n".join(lines)


def device_description(dry_run: bool) -> str:
    import torch

    if dry_run or not torch.cuda.is_available():
        from .report import device_name

        return device_name(torch.device("cpu"))
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    return f"{torch.cuda.get_device_name()} (driver {driver})"


def default_results_dir(dry_run: bool) -> Path:
    import torch

    if dry_run:
        return Path(tempfile.gettempdir()) / "fastpref-proof-dry-run"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the proof run needs a GPU (--dry-run runs its plumbing on a CPU)")
    return Path("benchmarks") / "results" / torch.cuda.get_device_name().lower().replace(" ", "-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.bench.proof", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on a CPU with tiny shapes and the torch backend")
    parser.add_argument("--results-dir", type=Path,
                        help="where every file goes (default: benchmarks/results/<gpu name>)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock seconds for the whole run, install included (default: 540)")
    parser.add_argument("--started", type=float, default=None,
                        help="Unix time the run (its install) started (default: now)")
    parser.add_argument("--steps", nargs="+", metavar="STEP",
                        help="run only these steps, in the usual order (default: all)")
    args = parser.parse_args(argv)
    started = args.started if args.started is not None else time.time()
    results = args.results_dir or default_results_dir(args.dry_run)
    results.mkdir(parents=True, exist_ok=True)
    steps = (dry_run_steps if args.dry_run else gpu_steps)(results)
    known = [step.name for step in steps]
    if args.steps:
        unknown = sorted(set(args.steps) - set(known))
        if unknown:
            parser.error(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(known)}")
        steps = [step for step in steps if step.name in args.steps]
    command = " ".join(["python -m fastpref.bench.proof", *(argv if argv is not None else sys.argv[1:])])
    device = device_description(args.dry_run)

    for step in steps:
        remaining = args.budget_s - (time.time() - started) - GRACE_S
        if remaining < 20:
            step.status = "skipped: the run's time budget is spent"
            continue
        print(f"[proof] {step.name}: up to {min(step.limit_s, remaining):.0f} s", flush=True)
        before = set(os.listdir(results))
        run_step(step, min(step.limit_s, remaining), results / f"{step.name}.log")
        step.files = sorted(set(os.listdir(results)) - before | {f"{step.name}.log"})
        print(f"[proof] {step.name}: {step.status} ({step.wall_s:.0f} s)", flush=True)
        if step.status != "ok":
            print("".join((results / f"{step.name}.log").read_text().splitlines(keepends=True)[-15:]), flush=True)

    report = summary(steps, results, command, device, args.dry_run)
    (results / "proof.md").write_text(report)
    print(report)
    print(f"[proof] results in {results}", flush=True)
    return 0 if all(step.status == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
