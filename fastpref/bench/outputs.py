"""Op "outputs": what each per-token output and the soft cap add to fastpref.linear_logprobs.

One backend, the same inputs for every variant: the log-probs alone, then each extra output of
``outputs=`` alone (the entropy twice: as a metric, and with its gradient in the loss), all of them
together, and the log-probs under a soft cap. Each variant's forward+backward time against the
log-probs alone, trainable and frozen head.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

import fastpref

from .. import backends as _backends
from . import options
from .measure import (Candidate, Progress, build_candidates, is_failure, measure_rows, memory_method,
                      runs_per_method, timing_note)
from .reference import (DTYPES, IGNORE_INDEX, LOGIT_STD, TOLERANCES, dtype_name, head_flop_floor, token_inputs,
                        token_reference)
from .report import MachineLoad, header, markdown_table, number

NAME = "outputs"
TITLE = "fastpref.linear_logprobs: the cost of each per-token output and of the soft cap"
HELP = "each per-token output (entropy, log sum p^2, mean logit, is_top1) and the soft cap vs log-probs alone"
IGNORED_FRACTION = 0.1
SOFTCAP = 30.0
BASE = "log_probs"
# variant -> (outputs asked for, the entropy's weight in the loss, soft cap)
VARIANTS: Dict[str, tuple] = {
    BASE: ((), 0.0, None),
    "entropy (metric)": (("entropy",), 0.0, None),
    "entropy (in the loss)": (("entropy",), 1.0, None),
    "log_sum_sq_probs": (("log_sum_sq_probs",), 0.0, None),
    "mean_logits": (("mean_logits",), 0.0, None),
    "is_top1": (("is_top1",), 0.0, None),
    "all four": (("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), 0.0, None),
    f"soft cap {SOFTCAP:g}": ((), 0.0, SOFTCAP),
}


def defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(n=16384, hidden=4096, vocab=128256, dtype="bfloat16", warmup=2, repeat=10)
    return dict(n=512, hidden=256, vocab=128256, dtype="float32", warmup=1, repeat=3)


@dataclass
class Config:
    device: torch.device
    n: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    backend: str
    heads: Sequence[str] = options.HEADS
    warmup: int = 1
    repeat: int = 3
    seed: int = 0


@dataclass
class Row:
    variant: str
    head: str
    backend: str
    n: int
    hidden: int
    vocab: int
    dtype: str
    status: str = "ok"
    time_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    logp_err: Optional[float] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=options.positive_int, help="tokens N (rows of hidden)")
    parser.add_argument("--hidden", type=options.positive_int, help="hidden size H")
    parser.add_argument("--vocab", type=options.positive_int, help="vocabulary size V")
    parser.add_argument("--backend", help="the fastpref backend to measure (default: the one backend=\"auto\" "
                                          "picks on the device)")
    options.add_common_arguments(parser, backends=False)
    parser.add_argument("--head", choices=("trainable", "frozen", "both"), default="both",
                        help="LM head requires grad (trainable), not (frozen), or measure both (default)")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = options.device_from_args(args, parser)
    chosen = defaults(device)
    for name in chosen:
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    available = fastpref.available_backends(device)
    backend = args.backend or _backends.resolve("auto", device).name
    if backend not in available:
        parser.error(f"--backend {backend} cannot run on {device}; available: {', '.join(available)}")
    return Config(device=device, n=chosen["n"], hidden=chosen["hidden"], vocab=chosen["vocab"],
                  dtype=DTYPES[chosen["dtype"]], backend=backend, heads=options.heads_from_args(args),
                  warmup=chosen["warmup"], repeat=chosen["repeat"])


def head_work(cfg: Config, head: str) -> float:
    """One head mode's measurements, in the units of planned_work: every variant's runs at the
    head's FLOP floor (a trainable head does twice a frozen one's work)."""
    return len(VARIANTS) * runs_per_method(cfg.warmup, cfg.repeat) * head_flop_floor(cfg.n, cfg.hidden, cfg.vocab,
                                                                                      head)


def planned_work(cfg: Config) -> float:
    """What run will advance its Progress by in all."""
    return sum(head_work(cfg, head) for head in cfg.heads)


def run(cfg: Config, rows: List[Row], progress: Progress = Progress()) -> None:
    """Append a row per variant and head mode to `rows` as each head's measurements finish."""
    hidden, weight, targets, grad_out = token_inputs(cfg.n, cfg.hidden, cfg.vocab, cfg.dtype, cfg.device, cfg.seed,
                                                     IGNORED_FRACTION)
    progress.describe("reference")
    ref = token_reference(hidden, weight, targets, grad_out)

    def reset() -> None:
        hidden.grad = weight.grad = None

    def build(row: Row) -> Candidate:
        outputs, entropy_weight, softcap = VARIANTS[row.variant]

        def step():
            got = fastpref.linear_logprobs(hidden, weight, targets, softcap=softcap, backend=cfg.backend,
                                           outputs=(BASE,) + outputs)
            objective = (got.log_probs * grad_out).sum()
            if entropy_weight:
                objective = objective + entropy_weight * got.entropy.sum()
            objective.backward()
            return got

        def check(got) -> bool:
            finite = all(torch.isfinite(getattr(got, name).float()).all() for name in (BASE,) + outputs)
            if softcap is not None:  # another distribution: only finite values to check here
                return bool(finite)
            row.logp_err = (got.log_probs.detach() - ref.logp).abs().max().item()
            return bool(finite) and row.logp_err <= TOLERANCES[cfg.dtype][0]

        return Candidate(row.variant, step, check, reset)

    for head in cfg.heads:
        weight.requires_grad_(head == "trainable")
        head_rows = [Row(variant, head, cfg.backend, cfg.n, cfg.hidden, cfg.vocab, dtype_name(cfg.dtype))
                     for variant in VARIANTS]
        measured, candidates = build_candidates(head_rows, build)
        measure_rows(measured, candidates, cfg.device, cfg.warmup, cfg.repeat, progress.within(f"{head} head"),
                     head_work(cfg, head))
        rows.extend(head_rows)


def format_table(rows: Sequence[Row]) -> str:
    base = {r.head: r.time_ms for r in rows if r.variant == BASE and r.status == "ok"}
    columns = ["variant", "head", "backend", "N", "H", "V", "dtype", "time fwd+bwd (ms)", "x log_probs alone",
               "added (ms)", "peak mem over inputs (MiB)", "max abs dlogp"]
    cells = []
    for r in rows:
        if r.status != "ok":
            time_ms = ratio = added = peak = r.status
        else:
            time_ms, peak = number(r.time_ms), "n/a" if r.peak_mib is None else number(r.peak_mib)
            reference = base.get(r.head)
            ratio = f"{r.time_ms / reference:.2f}x" if reference else "-"
            added = number(r.time_ms - reference) if reference else "-"
        cells.append([r.variant, r.head, r.backend, str(r.n), str(r.hidden), str(r.vocab), r.dtype, time_ms, ratio,
                      added, peak, "-" if r.logp_err is None else f"{r.logp_err:.2e}"])
    return markdown_table(columns, cells)


def format_report(rows: Sequence[Row], cfg: Config, command: str, machine: Optional[MachineLoad] = None) -> str:
    notes = [
        f"inputs: hidden ~ N(0, 1), weight ~ N(0, {LOGIT_STD}^2 / H), {IGNORED_FRACTION:.0%} of targets ="
        f" {IGNORE_INDEX}, upstream gradient ~ N(0, 1) on the log-probs",
        "variants: the outputs asked for with outputs=; 'entropy (in the loss)' adds the entropy's sum to the"
        " backpropagated objective (its gradient term), 'entropy (metric)' only computes it; the soft-cap row"
        " computes the log-probs of softcap * tanh(z / softcap)",
        "x log_probs alone: the variant's time over the first row's, same head",
        timing_note(cfg.warmup, cfg.repeat),
        f"peak memory: one run after the warm-up, {memory_method(cfg.device)}",
        "max abs dlogp: against a float32 row-chunked reference (not for the soft-capped row, another distribution)",
    ]
    return "\n".join([*header(TITLE, cfg.device, command, machine, notes), format_table(rows), ""])


def failures(rows: Sequence[Row]) -> List[str]:
    return [f"{r.variant} ({r.head} head): {r.status}" for r in rows if is_failure(r.status)]


def plot(rows: Sequence[Row], cfg: Config, path) -> None:
    """Time and peak memory of each variant, a bar each, per head mode."""
    from .plots import method_figure

    method_figure(rows, path, panel_rows=[cfg.backend], panel_of=lambda r: r.backend, x_of=lambda r: r.n,
                  x_label="N (tokens)", method_of=lambda r: r.variant,
                  title=f"linear_logprobs outputs, H={cfg.hidden}, V={cfg.vocab}, {dtype_name(cfg.dtype)},"
                        f" {cfg.device.type}")
