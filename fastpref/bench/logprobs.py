"""Op "logprobs": fastpref.linear_logprobs alone against the materialized baseline and the peers' heads.

Each method computes per-token log-probs of the targets from hidden [N, H] and the head
[V, H], then backpropagates a random upstream gradient, with the LM head trainable or frozen.
The peers (fastpref.bench.peers) get the scored rows, as a caller drops prompt and padding
before a fused head; a peer that cannot run here is a row that says why. quack-chunked is QuACK's
summed-loss head: it backpropagates an upstream gradient of 1 on every scored token instead
(no per-token log-probs), checked against the reference for that gradient.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

import fastpref

from . import options, peers
from .measure import (Candidate, Progress, build_candidates, is_failure, measure_rows, memory_method,
                      runs_per_method, timing_note)
from .reference import (DTYPES, IGNORE_INDEX, LOGIT_STD, TOLERANCES, dtype_name, head_flop_floor,
                        materialized_logprobs, relative_error, tflops, token_inputs, token_reference)
from .report import MachineLoad, header, markdown_table, number

NAME = "logprobs"
TITLE = "fastpref.linear_logprobs: forward+backward benchmark"
HELP = "fastpref.linear_logprobs alone vs the materialized baseline and the peers' per-token heads"
BASELINE = "materialized"
# Not a method: the head's FLOP floor run as plain matmuls, timed in the same rounds, so that each
# method's time reads as a multiple of what the hardware does with the same FLOPs.
GEMM_FLOOR = "gemm-floor"
GEMM_FLOOR_COLUMNS = 8192
IGNORED_FRACTION = 0.1
PEERS = (peers.TORCH_NATIVE, peers.LIGER_CUTE, peers.QUACK, peers.QUACK_CHUNKED)


def defaults(device: torch.device) -> dict:
    """A Llama-3-sized vocabulary everywhere; a realistic hidden size and N on GPUs, and a CPU run
    of a few seconds."""
    if device.type == "cuda":
        return dict(n=16384, hidden=4096, vocab=128256, dtype="bfloat16", warmup=2, repeat=10)
    return dict(n=512, hidden=256, vocab=128256, dtype="float32", warmup=1, repeat=2)


@dataclass
class Config:
    device: torch.device
    n: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    backends: Sequence[str]
    peers: Sequence[str] = PEERS
    heads: Sequence[str] = options.HEADS
    warmup: int = 1  # untimed runs; the first one is checked against the reference
    repeat: int = 3
    seed: int = 0


@dataclass
class Row:
    """status: "ok", "OOM", "WRONG", "ERROR: <type>: <message>" or "n/a (why)"; the measurements
    are None when it is not "ok" (peak_mib also where memory cannot be measured on this platform)."""

    method: str
    head: str
    n: int
    scored: int  # targets that are not ignored: the rows the FLOP floor counts
    hidden: int
    vocab: int
    dtype: str
    status: str = "ok"
    time_ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None
    logp_err: Optional[float] = None
    grad_err: Optional[float] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=options.positive_int, help="tokens N (rows of hidden)")
    parser.add_argument("--hidden", type=options.positive_int, help="hidden size H")
    parser.add_argument("--vocab", type=options.positive_int, help="vocabulary size V")
    parser.add_argument("--peers", nargs="*", choices=PEERS,
                        help=f"other projects' heads to measure (default: all of {', '.join(PEERS)})")
    options.add_common_arguments(parser)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = options.device_from_args(args, parser)
    chosen = defaults(device)
    for name in chosen:
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    return Config(device=device, n=chosen["n"], hidden=chosen["hidden"], vocab=chosen["vocab"],
                  dtype=DTYPES[chosen["dtype"]], backends=options.backends_from_args(args, parser, device),
                  peers=PEERS if args.peers is None else list(dict.fromkeys(args.peers)),
                  heads=options.heads_from_args(args), warmup=chosen["warmup"], repeat=chosen["repeat"])


def method_function(method: str, device: torch.device, dtype: torch.dtype,
                    num_kept: Optional[int] = None) -> Union[Callable[..., torch.Tensor], str]:
    """(hidden, weight, targets) -> [N] log-probs for a per-token method of the table, or why it
    cannot run here. num_kept: the targets that count, known on the host as a packed layout knows
    them (fastpref then computes those rows only)."""
    if method == BASELINE:
        return lambda h, w, t: materialized_logprobs(h, w, t)
    if method in peers.PER_TOKEN:
        fn = peers.PER_TOKEN[method](device, dtype)
        return fn if isinstance(fn, str) else peers.on_scored_rows(fn)
    backend = method[len("fastpref-"):]
    return lambda h, w, t: fastpref.linear_logprobs(h, w, t, ignore_index=IGNORE_INDEX, num_kept=num_kept,
                                                    backend=backend)


def methods(cfg: Config) -> List[str]:
    return [BASELINE] + list(cfg.peers) + [f"fastpref-{name}" for name in cfg.backends] + [GEMM_FLOOR]


def gemm_floor_step(hidden: torch.Tensor, weight: torch.Tensor, head: str) -> None:
    """The head's FLOP floor as plain matmuls over vocabulary chunks: per chunk W_c, z = h W_c^T
    and z W_c (4 N H V_c), and for a trainable head z^T h and h W_c^T again (8 N H V_c)."""
    with torch.no_grad():
        for start in range(0, weight.shape[0], GEMM_FLOOR_COLUMNS):
            chunk = weight[start:start + GEMM_FLOOR_COLUMNS]
            z = hidden @ chunk.t()
            z @ chunk
            if head == "trainable":
                z.t() @ hidden
                hidden @ chunk.t()


def head_work(cfg: Config, head: str) -> float:
    """One head mode's measurements, in the units of planned_work: every method's runs at the
    head's FLOP floor (a trainable head does twice a frozen one's work)."""
    return len(methods(cfg)) * runs_per_method(cfg.warmup, cfg.repeat) * head_flop_floor(cfg.n, cfg.hidden,
                                                                                          cfg.vocab, head)


def planned_work(cfg: Config) -> float:
    """What run will advance its Progress by in all."""
    return sum(head_work(cfg, head) for head in cfg.heads)


def run(cfg: Config, rows: List[Row], progress: Progress = Progress()) -> None:
    """Append a row per method and head mode to `rows` as each head's measurements finish."""
    hidden, weight, targets, grad_out = token_inputs(cfg.n, cfg.hidden, cfg.vocab, cfg.dtype, cfg.device, cfg.seed,
                                                     IGNORED_FRACTION)
    progress.describe("reference")
    ref = token_reference(hidden, weight, targets, grad_out)

    def reset() -> None:
        hidden.grad = weight.grad = None

    scored_hidden = hidden.detach()[targets != IGNORE_INDEX]
    uniform_ref = []  # the reference for an upstream gradient of 1, built for quack-chunked only

    def build(row: Row) -> Union[Candidate, str]:
        if row.method == GEMM_FLOOR:
            return Candidate(row.method, lambda: gemm_floor_step(scored_hidden, weight.detach(), row.head),
                             lambda output: True)
        if row.method == peers.QUACK_CHUNKED:
            fn = peers.quack_chunked_sum(cfg.device, cfg.dtype, cfg.vocab)
            if isinstance(fn, str):
                return fn
            if not uniform_ref:
                progress.describe("reference for an upstream gradient of 1")
                uniform_ref.append(token_reference(hidden, weight, targets, torch.ones_like(grad_out)))
            return _summed_candidate(row, fn, hidden, weight, targets, uniform_ref[0], cfg.dtype, reset)
        fn = method_function(row.method, cfg.device, cfg.dtype, scored)
        if isinstance(fn, str):
            return fn
        return _candidate(row, fn, hidden, weight, targets, grad_out, ref, cfg.dtype, reset)

    scored = scored_hidden.shape[0]
    for head in cfg.heads:
        weight.requires_grad_(head == "trainable")
        head_rows = [Row(method, head, cfg.n, scored, cfg.hidden, cfg.vocab, dtype_name(cfg.dtype))
                     for method in methods(cfg)]
        measured, candidates = build_candidates(head_rows, build)
        measure_rows(measured, candidates, cfg.device, cfg.warmup, cfg.repeat, progress.within(f"{head} head"),
                     head_work(cfg, head))
        for row in measured:
            if row.status == "ok":
                row.tflops = tflops(head_flop_floor(row.scored, row.hidden, row.vocab, row.head), row.time_ms)
        rows.extend(head_rows)


def _gradient_error(row: Row, hidden, weight, ref) -> float:
    error = relative_error(hidden.grad, ref.d_hidden)
    if row.head == "trainable":
        error = max(error, relative_error(weight.grad, ref.d_weight))
    return error


def _candidate(row: Row, fn, hidden, weight, targets, grad_out, ref, dtype, reset) -> Candidate:
    def step() -> torch.Tensor:
        logp = fn(hidden, weight, targets)
        logp.backward(grad_out)
        return logp

    def check(logp: torch.Tensor) -> bool:
        row.logp_err = (logp.detach() - ref.logp).abs().max().item()
        row.grad_err = _gradient_error(row, hidden, weight, ref)
        logp_tol, grad_tol = TOLERANCES[dtype]
        return row.logp_err <= logp_tol and row.grad_err <= grad_tol

    return Candidate(row.method, step, check, reset)


def _summed_candidate(row: Row, fn, hidden, weight, targets, uniform_ref, dtype, reset) -> Candidate:
    """A head that returns the summed log-prob of the scored tokens; its logp_err is that sum's
    error per scored token."""
    scored = int((targets != IGNORE_INDEX).sum())

    def step() -> torch.Tensor:
        total = fn(hidden, weight, targets)
        total.backward()
        return total

    def check(total: torch.Tensor) -> bool:
        row.logp_err = abs(total.item() - uniform_ref.logp.sum().item()) / max(1, scored)
        row.grad_err = _gradient_error(row, hidden, weight, uniform_ref)
        logp_tol, grad_tol = TOLERANCES[dtype]
        return row.logp_err <= logp_tol and row.grad_err <= grad_tol

    return Candidate(row.method, step, check, reset)


def gradients_mib(row: Row) -> float:
    """The input gradients a run leaves alive: d_hidden, and d_weight for a trainable head."""
    elements = row.n * row.hidden + (row.vocab * row.hidden if row.head == "trainable" else 0)
    return elements * DTYPES[row.dtype].itemsize / 2**20


def extra_mib(row: Row) -> Optional[float]:
    """A run's peak memory beyond its inputs and the gradients it returns."""
    return None if row.peak_mib is None else max(0.0, row.peak_mib - gradients_mib(row))


def format_table(rows: Sequence[Row]) -> str:
    """Memory ratios are against the baseline with the same head."""
    baseline = {r.head: extra_mib(r) for r in rows if r.method == BASELINE and r.status == "ok" and r.peak_mib}
    floor = {r.head: r.time_ms for r in rows if r.method == GEMM_FLOOR and r.status == "ok"}
    columns = ["method", "head", "N", "H", "V", "dtype", "time fwd+bwd (ms)", "x GEMM floor", "TFLOP/s",
               "peak mem over inputs (MiB)", "extra over gradients (MiB)", "extra vs baseline", "max abs dlogp",
               "grad rel err"]
    cells = []
    for r in rows:
        if r.status != "ok":
            time_ms, times_floor, rate, peak, extra, ratio = r.status, "-", "-", "-", "-", "-"
        else:
            time_ms, rate = number(r.time_ms), number(r.tflops, 2)
            times_floor = f"{r.time_ms / floor[r.head]:.2f}x" if floor.get(r.head) else "-"
            peak = "n/a" if r.peak_mib is None else number(r.peak_mib)
            extra = "n/a" if r.peak_mib is None else number(extra_mib(r))
            base = baseline.get(r.head)
            ratio = "n/a" if r.peak_mib is None or not base else f"{100 * extra_mib(r) / base:.1f}%"
        errors = ["-" if e is None else f"{e:.2e}" for e in (r.logp_err, r.grad_err)]
        cells.append([r.method, r.head, str(r.n), str(r.hidden), str(r.vocab), r.dtype, time_ms, times_floor, rate,
                      peak, extra, ratio, *errors])
    return markdown_table(columns, cells)


def format_report(rows: Sequence[Row], cfg: Config, command: str, machine: Optional[MachineLoad] = None) -> str:
    notes = [
        f"inputs: hidden ~ N(0, 1), weight ~ N(0, {LOGIT_STD}^2 / H), {IGNORED_FRACTION:.0%} of targets ="
        f" {IGNORE_INDEX}, upstream gradient ~ N(0, 1)",
        f"methods: {BASELINE} = full [N, V] logits, float32 log-softmax, gather (as in TRL);"
        f" {peers.TORCH_NATIVE} = torch.nn.functional.linear_cross_entropy(reduction='none',"
        " options=torch.nn.LinearCrossEntropyOptions()); "
        f"{peers.LIGER_CUTE} = Liger-Kernel's LigerFusedLinearScaledCrossEntropyFunction on its sm_90 CuTe head;"
        f" {peers.QUACK} = QuACK's linear_cross_entropy_func(reduction='none') (cuBLAS logits, QuACK's"
        f" cross-entropy kernels); {peers.QUACK_CHUNKED} = QuACK's chunked_linear_cross_entropy(reduction='sum'):"
        " its gradient is computed in the forward for the summed loss, so its row backpropagates 1 on every scored"
        " token and its max abs dlogp is the summed log-prob's error per scored token; the peers get the scored"
        " rows; fastpref-<backend> = fastpref.linear_logprobs",
        f"{GEMM_FLOOR}: not a method, the FLOP floor as plain matmuls ([N_scored, H] x [H, {GEMM_FLOOR_COLUMNS}]"
        " vocabulary chunks: 4 per chunk for a trainable head, 2 for a frozen one), timed in the same rounds;"
        " x GEMM floor = a row's time over it",
        timing_note(cfg.warmup, cfg.repeat),
        "TFLOP/s: the FLOP floor 8 N_scored H V (trainable head) or 4 N_scored H V (frozen head) over the"
        " time, N_scored = targets not ignored",
        f"peak memory: one run after the warm-up, {memory_method(cfg.device)}; the input gradients are"
        " alive at the end of the run and count; extra over gradients = peak minus their size (what the"
        " method holds beyond its inputs and outputs), against the baseline's",
        "max abs dlogp, grad rel err: against a float32 row-chunked reference of the baseline's math"
        " (grad: max |error| / max |reference|, over d_hidden and, for a trainable head, d_weight)",
    ]
    return "\n".join([*header(TITLE, cfg.device, command, machine, notes), format_table(rows), ""])


def failures(rows: Sequence[Row]) -> List[str]:
    return [f"{r.method} ({r.head} head): {r.status}" for r in rows if is_failure(r.status)]


def plot(rows: Sequence[Row], cfg: Config, path) -> None:
    """Time and peak memory of each method (and the GEMM floor's time), a bar each, per head mode."""
    from .plots import method_figure

    method_figure([r for r in rows if not r.status.startswith("n/a")], path, panel_rows=["logprobs"],
                  panel_of=lambda r: "logprobs", x_of=lambda r: r.n, x_label="N (tokens)",
                  title=f"linear_logprobs, H={cfg.hidden}, V={cfg.vocab}, {dtype_name(cfg.dtype)}, {cfg.device.type}")

