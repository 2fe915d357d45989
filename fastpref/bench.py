"""Benchmark: forward+backward time and peak memory of fastpref vs the materialized baseline.

Two ops: "logprobs" times fastpref.linear_logprobs alone; "preference" times a whole preference
loss (DPO sigmoid, IPO, SimPO) from TRL's padded batch, against TRL's materialized computation and
Liger-Kernel's chunked losses, since that scalar loss is what a training step actually backpropagates.

The point of the fused op is to never hold the [N x V] logits, so the number that matters is the
memory a training step adds on top of its inputs; time shows what that costs. Each method runs
the same step on the same inputs: per-token log-probs of the targets, then a backward pass driven
by a random upstream gradient, with the LM head either trainable or frozen (LoRA-style).

Every method's first run is checked against a float32 reference before anything is timed, so a
fast wrong answer never makes it into the table.

Memory is the peak over what is allocated when the run starts (inputs, reference, framework):
on CUDA from the caching allocator's statistics, on Linux CPUs from the process's resident-set
high-water mark (VmHWM), which the harness resets before each run. Elsewhere it is "n/a".
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastpref

OPS = ("logprobs", "preference")
BASELINE = "materialized"
# The preference op's methods besides fastpref-<backend>; TRL's is its baseline.
TRL = "trl-materialized"
LIGER = "liger"
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")
AVERAGED_LOSSES = frozenset({"ipo", "simpo"})  # TRL averages their log-probs over the response
BETA = 0.1
SIMPO_GAMMA = 0.5
HEADS = ("trainable", "frozen")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
# Logits z = W h have standard deviation LOGIT_STD: a softmax that is neither flat nor one-hot.
LOGIT_STD = 2.0
# A run is wrong when max |logp - reference| or a gradient's max error relative to the
# reference's largest entry exceeds these. Loose enough for the baseline's own low-precision
# logits and for TF32, tight enough to catch a dropped vocabulary block or a wrong gradient.
TOLERANCES = {
    torch.float32: (1e-2, 1e-2),
    torch.bfloat16: (1e-1, 5e-2),
    torch.float16: (5e-2, 2e-2),
}
# Row chunks of the reference hold at most this many logits at once.
REFERENCE_CHUNK_ELEMENTS = 1 << 24
# A 1-minute load average above this marks the report's times as taken on a shared machine.
SHARED_LOAD = 2.0
_MIB = float(1 << 20)


def defaults(device: torch.device, op: str = "logprobs") -> dict:
    """Shapes and repeats for `device`: a Llama-3-sized vocabulary everywhere, a realistic
    hidden size and batch on GPUs, and a CPU run that fits in a couple of minutes. The preference
    op runs three losses and three kinds of method, so its CPU run uses a smaller vocabulary."""
    if op == "preference":
        if device.type == "cuda":
            return dict(pairs=8, seq_len=2048, hidden=4096, vocab=128256, dtype="bfloat16", warmup=3, repeat=10)
        return dict(pairs=4, seq_len=512, hidden=512, vocab=32768, dtype="float32", warmup=1, repeat=1)
    if device.type == "cuda":
        return dict(n=16384, hidden=4096, vocab=128256, dtype="bfloat16", warmup=3, repeat=10)
    return dict(n=4096, hidden=512, vocab=128256, dtype="float32", warmup=1, repeat=3)


@dataclass
class Config:
    device: torch.device
    n: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    backends: Sequence[str]
    heads: Sequence[str] = HEADS
    warmup: int = 1  # untimed runs; the first one is checked against the reference
    repeat: int = 3
    seed: int = 0
    op: str = "logprobs"
    pairs: int = 0  # the preference op's batch: 2 * pairs padded rows of seq_len tokens (n = 2 pairs T)
    seq_len: int = 0
    losses: Sequence[str] = PREFERENCE_LOSSES


@dataclass
class Row:
    """One method on one head mode (and one loss for the preference op). status is "ok", "OOM",
    "WRONG" or "n/a (why)"; the measurements are None when it is not "ok" (peak_mib also when
    memory cannot be measured on this platform). The logprobs op fills logp_err, the preference
    op loss_err (relative), pairs and seq_len."""

    method: str
    head: str
    n: int
    hidden: int
    vocab: int
    dtype: str
    status: str
    time_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    logp_err: Optional[float] = None
    grad_err: Optional[float] = None
    loss: Optional[str] = None
    pairs: Optional[int] = None
    seq_len: Optional[int] = None
    loss_err: Optional[float] = None


def materialized_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The standard computation (as in TRL): full [N, V] logits, float32 log-softmax, gather."""
    logits = hidden @ weight.t()
    kept = targets != ignore_index
    safe_targets = torch.where(kept, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logp * kept


# ---------------------------------------------------------------------------------------------
# Peak memory


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def _set_malloc(measuring_memory: bool) -> None:
    """Tune glibc's malloc for a memory measurement, or back to how it settles in a long run.

    glibc serves big blocks with mmap, but after one is freed it raises its mmap threshold (up to
    32 MiB, with a trim threshold of twice that) and keeps later blocks of that size in the heap,
    resident after they are freed: freed memory would inflate a run's peak, and one run's
    leftovers would hide the next run's. While measuring, a fixed 1 MiB mmap threshold unmaps
    every sizeable tensor on free and a 128 KiB trim threshold shrinks the heap top (smaller
    blocks stay in the heap; PeakMemory.start trims it). That costs a page fault per fresh page,
    so timed runs use the 32 MiB / 64 MiB thresholds glibc itself ends up with.
    """
    if _LIBC is None:
        return
    if measuring_memory:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    else:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _read_proc_status() -> dict:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_resident_peak() -> bool:
    """Reset the process's VmHWM to its current resident size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return "VmHWM" in _read_proc_status()
    except OSError:
        return False


class PeakMemory:
    """Peak memory a piece of code adds over what is allocated when it starts, in MiB.

    CUDA: max_memory_allocated() - memory_allocated() at start (the caching allocator's view of
    live tensors, not what it has reserved). CPU on Linux: VmHWM - VmRSS at start, after returning
    freed heap memory to the OS. On CPU every resident page counts, so this includes the
    allocator's slack and anything else the process touches meanwhile.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.supported = device.type == "cuda" or (device.type == "cpu" and _reset_resident_peak())
        self._base = 0
        if self.supported and device.type == "cpu":
            _set_malloc(measuring_memory=False)  # the same allocator state for every run

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.supported:
            gc.collect()
            _set_malloc(measuring_memory=True)
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            _reset_resident_peak()
            self._base = _read_proc_status()["VmRSS"]

    def stop(self) -> Optional[float]:
        if not self.supported:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / _MIB
        peak = _read_proc_status()["VmHWM"] - self._base
        _set_malloc(measuring_memory=False)
        return peak / _MIB


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        phrase in message for phrase in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


# ---------------------------------------------------------------------------------------------
# Inputs and reference


@dataclass
class Inputs:
    hidden: torch.Tensor   # [N, H], requires grad
    weight: torch.Tensor   # [V, H]; requires grad for the trainable head
    targets: torch.Tensor  # [N] int64, IGNORED_FRACTION of them IGNORE_INDEX
    grad_out: torch.Tensor  # [N] float32 upstream gradient of the log-probs


def make_inputs(cfg: Config) -> Inputs:
    """Random inputs with realistic logits: hidden ~ N(0, 1), weight ~ N(0, LOGIT_STD^2 / H)."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    kw = dict(device=cfg.device, generator=gen)
    hidden = torch.randn(cfg.n, cfg.hidden, dtype=cfg.dtype, **kw)
    weight = torch.randn(cfg.vocab, cfg.hidden, dtype=cfg.dtype, **kw).mul_(LOGIT_STD / math.sqrt(cfg.hidden))
    targets = torch.randint(0, cfg.vocab, (cfg.n,), **kw)
    targets[torch.rand(cfg.n, **kw) < IGNORED_FRACTION] = IGNORE_INDEX
    grad_out = torch.randn(cfg.n, dtype=torch.float32, **kw)
    return Inputs(hidden.requires_grad_(), weight, targets, grad_out)


@dataclass
class Reference:
    logp: torch.Tensor
    d_hidden: torch.Tensor
    d_weight: torch.Tensor


def reference(inputs: Inputs) -> Reference:
    """The baseline's math in float32 on the same inputs, a few rows at a time so that it fits
    wherever the methods under test do."""
    hidden = inputs.hidden.detach().float()
    weight = inputs.weight.detach().float().requires_grad_()
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // weight.shape[0])
    logps, d_hidden = [], []
    for r0 in range(0, hidden.shape[0], rows):
        h = hidden[r0:r0 + rows].requires_grad_()
        logp = materialized_logprobs(h, weight, inputs.targets[r0:r0 + rows])
        logp.backward(inputs.grad_out[r0:r0 + rows])
        logps.append(logp.detach())
        d_hidden.append(h.grad)
    return Reference(torch.cat(logps), torch.cat(d_hidden), weight.grad)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.float() - want).abs().max().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# Measurement


def method_function(method: str) -> Callable[..., torch.Tensor]:
    """(hidden, weight, targets) -> [N] log-probs for a method name in the table."""
    if method == BASELINE:
        return lambda h, w, t: materialized_logprobs(h, w, t)
    backend = method[len("fastpref-"):]
    return lambda h, w, t: fastpref.linear_logprobs(h, w, t, ignore_index=IGNORE_INDEX, backend=backend)


def _row(method: str, head: str, cfg: Config, status: str) -> Row:
    dtype = str(cfg.dtype).replace("torch.", "")
    return Row(method, head, cfg.n, cfg.hidden, cfg.vocab, dtype, status)


def _clear_grads(inputs) -> None:
    """inputs: Inputs or PreferenceInputs."""
    inputs.hidden.grad = None
    inputs.weight.grad = None


def _peak_memory(step: Callable[[], object], meter: PeakMemory) -> Optional[float]:
    """Peak MiB of one step over what is allocated before it; the gradients it leaves count."""
    meter.start()
    step()
    return meter.stop()


def _time_ms(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    begin_s = time.perf_counter()
    step()
    return (time.perf_counter() - begin_s) * 1e3


def _check_then_time(row: Row, step: Callable[[], torch.Tensor], check: Callable[[torch.Tensor], bool],
                     inputs, cfg: Config, meter: PeakMemory) -> Row:
    """Run `step` once and let `check` judge it (it records the errors on the row); only a right
    answer is then warmed up, measured for memory and timed."""
    output = step()
    right = check(output)
    del output
    _clear_grads(inputs)
    if not right:
        row.status = "WRONG"
        return row
    for _ in range(cfg.warmup - 1):
        step()
        _clear_grads(inputs)
    row.peak_mib = _peak_memory(step, meter)
    _clear_grads(inputs)
    times = []
    for _ in range(cfg.repeat):
        times.append(_time_ms(step, cfg.device))
        _clear_grads(inputs)
    row.time_ms = statistics.median(times)
    return row


def _measure(method: str, head: str, inputs: Inputs, ref: Reference, cfg: Config,
             meter: PeakMemory) -> Row:
    fn = method_function(method)
    row = _row(method, head, cfg, "ok")

    def step() -> torch.Tensor:
        logp = fn(inputs.hidden, inputs.weight, inputs.targets)
        logp.backward(inputs.grad_out)
        return logp

    def check(logp: torch.Tensor) -> bool:
        row.logp_err = (logp.detach() - ref.logp).abs().max().item()
        row.grad_err = _relative_error(inputs.hidden.grad, ref.d_hidden)
        if head == "trainable":
            row.grad_err = max(row.grad_err, _relative_error(inputs.weight.grad, ref.d_weight))
        logp_tol, grad_tol = TOLERANCES[cfg.dtype]
        return row.logp_err <= logp_tol and row.grad_err <= grad_tol

    return _check_then_time(row, step, check, inputs, cfg, meter)


def _measure_or_oom(measure: Callable[[], Row], oom_row: Row, head: str, inputs, cfg: Config) -> Row:
    """measure() with the LM head trainable or frozen; running out of memory gives oom_row."""
    inputs.weight.requires_grad_(head == "trainable")
    try:
        row = measure()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raise
        if not is_out_of_memory(exc):
            raise
        row = oom_row
    # Outside the except block, so that the traceback's frames (and their logits) are gone.
    _clear_grads(inputs)
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(cfg: Config, progress: bool = True) -> List[Row]:
    """Measure the baseline and fastpref-<backend> for every backend in cfg, for each head mode
    (and, for the preference op, each loss with Liger-Kernel as well)."""
    if cfg.op == "preference":
        return run_preference(cfg, progress)
    methods = [BASELINE] + [f"fastpref-{name}" for name in cfg.backends]
    jobs = [(method, head) for head in cfg.heads for method in methods]
    meter = PeakMemory(cfg.device)
    inputs = make_inputs(cfg)
    bar = tqdm(total=len(jobs) + 1, disable=None if progress else True, desc="reference", leave=False)
    with bar:
        ref = reference(inputs)
        bar.update()
        rows = []
        for method, head in jobs:
            bar.set_description(f"{method} ({head} head)")
            rows.append(_measure_or_oom(
                lambda: _measure(method, head, inputs, ref, cfg, meter),
                _row(method, head, cfg, "OOM"), head, inputs, cfg))
            bar.update()
    return rows


# ---------------------------------------------------------------------------------------------
# The preference op


@dataclass
class PreferenceInputs:
    hidden: torch.Tensor   # [2B, T, H] in TRL's padded layout (chosen rows first), requires grad
    weight: torch.Tensor   # [V, H]; requires grad for the trainable head
    targets: torch.Tensor  # [2B, T]: IGNORE_INDEX over the prompt and the right padding
    policy_logps: torch.Tensor  # [2B] float32 summed response log-probs of the policy


def make_preference_inputs(cfg: Config) -> PreferenceInputs:
    """Random pairs: per row a prompt of 1 to T/4 tokens, a response of T/4 tokens to the rest of
    the row, then padding; hidden and weight as in make_inputs."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    kw = dict(device=cfg.device, generator=gen)
    rows, length = 2 * cfg.pairs, cfg.seq_len
    hidden = torch.randn(rows, length, cfg.hidden, dtype=cfg.dtype, **kw)
    weight = torch.randn(cfg.vocab, cfg.hidden, dtype=cfg.dtype, **kw).mul_(LOGIT_STD / math.sqrt(cfg.hidden))
    targets = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long, device=cfg.device)
    for row in range(rows):
        prompt = int(torch.randint(1, max(2, length // 4 + 1), (1,), **kw))
        response = int(torch.randint(max(1, length // 4), length - prompt + 1, (1,), **kw))
        targets[row, prompt:prompt + response] = torch.randint(0, cfg.vocab, (response,), **kw)
    policy_logps = _float32_logprobs(hidden, weight, targets).sum(-1)
    return PreferenceInputs(hidden.requires_grad_(), weight, targets, policy_logps)


def _float32_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[rows, T] float32 log-probs without gradients, a few rows at a time."""
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // (weight.shape[0] * targets.shape[1]))
    with torch.no_grad():
        return torch.cat([materialized_logprobs(hidden[r0:r0 + rows].float(), weight.float(), targets[r0:r0 + rows])
                          for r0 in range(0, hidden.shape[0], rows)])


def reference_logps_for(loss_type: str, inputs: PreferenceInputs) -> Optional[torch.Tensor]:
    """The precomputed reference log-probs each loss is given. SimPO takes none. The sigmoid rows
    use a zero reference, the only one Liger-Kernel's DPO accepts without running a reference
    model (use_ref_model=False); what the reference holds costs nothing either way. IPO gets a
    reference close to the policy, as at the start of training."""
    if loss_type == "simpo":
        return None
    if loss_type == "sigmoid":
        return torch.zeros_like(inputs.policy_logps)
    gen = torch.Generator(inputs.policy_logps.device).manual_seed(1)
    noise = torch.randn(inputs.policy_logps.shape, generator=gen, device=inputs.policy_logps.device)
    return inputs.policy_logps + noise


def trl_pair_loss(seq_logps: torch.Tensor, lengths: torch.Tensor, reference_logps: Optional[torch.Tensor],
                  loss_type: str) -> torch.Tensor:
    """TRL's loss from [2B] summed response log-probs (chosen first): DPO sigmoid on sums, IPO
    and SimPO on means over the response tokens (the reference's too), averaged over pairs."""
    if loss_type in AVERAGED_LOSSES:
        seq_logps = seq_logps / lengths
        reference_logps = None if reference_logps is None else reference_logps / lengths
    chosen, rejected = seq_logps.chunk(2)
    if loss_type == "simpo":
        return -F.logsigmoid(BETA * (chosen - rejected) - SIMPO_GAMMA).mean()
    ref_chosen, ref_rejected = reference_logps.chunk(2)
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(BETA * margin).mean()
    return ((margin - 1 / (2 * BETA)) ** 2).mean()


def trl_materialized_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reference_logps: Optional[torch.Tensor], loss_type: str) -> torch.Tensor:
    """TRL's computation: logits over the whole padded batch, masked sums per row, the formula."""
    logp = materialized_logprobs(hidden, weight, targets)
    lengths = (targets != IGNORE_INDEX).sum(-1)
    return trl_pair_loss(logp.sum(-1), lengths, reference_logps, loss_type)


@dataclass
class PreferenceReference:
    loss: torch.Tensor
    d_hidden: torch.Tensor  # [2B * T, H]
    d_weight: torch.Tensor


def preference_reference(inputs: PreferenceInputs, loss_type: str) -> PreferenceReference:
    """TRL's math in float32, in two passes so that it fits wherever the methods do: the loss and
    its gradient w.r.t. each sequence's log-prob from the policy's log-probs, then the row-chunked
    logprobs reference driven by that gradient on every response token of the sequence."""
    lengths = (inputs.targets != IGNORE_INDEX).sum(-1)
    seq_logps = inputs.policy_logps.clone().requires_grad_()
    loss = trl_pair_loss(seq_logps, lengths, reference_logps_for(loss_type, inputs), loss_type)
    (d_seq,) = torch.autograd.grad(loss, seq_logps)
    hidden_size = inputs.hidden.shape[-1]
    per_token = Inputs(inputs.hidden.reshape(-1, hidden_size), inputs.weight, inputs.targets.reshape(-1),
                       d_seq.unsqueeze(1).expand(inputs.targets.shape).reshape(-1))
    ref = reference(per_token)
    return PreferenceReference(loss.detach(), ref.d_hidden, ref.d_weight)


def preference_methods(backends: Sequence[str]) -> List[str]:
    return [TRL, LIGER] + [f"fastpref-{name}" for name in backends]


def preference_step_function(method: str, loss_type: str, cfg: Config) -> Optional[Callable[..., torch.Tensor]]:
    """(hidden [2B, T, H], weight, targets [2B, T], reference_logps) -> scalar loss, or None where
    the method has no such loss (Liger-Kernel has no IPO)."""
    if method == TRL:
        return lambda h, w, t, r: trl_materialized_loss(h, w, t, r, loss_type)
    if method == LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss

        compiled = cfg.device.type == "cuda"  # torch.compile of its chunk step needs a GPU to pay off
        if loss_type == "sigmoid":
            liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=compiled, loss_type="sigmoid")
        elif loss_type == "simpo":
            liger = LigerFusedLinearSimPOLoss(beta=BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False,
                                              compiled=compiled)
        else:
            return None
        return lambda h, w, t, r: liger(w, h, t)[0]
    module = fastpref.PreferenceLoss(loss_type, beta=BETA, simpo_gamma=SIMPO_GAMMA,
                                     backend=method[len("fastpref-"):])

    def fastpref_loss(h, w, t, r):
        batch = fastpref.pack_padded(h, t, ignore_index=IGNORE_INDEX)
        return module(batch.hidden, w, batch.targets, batch.layout, r)[0]

    return fastpref_loss


def _preference_row(method: str, loss_type: str, head: str, cfg: Config, status: str) -> Row:
    row = _row(method, head, cfg, status)
    row.loss, row.pairs, row.seq_len = loss_type, cfg.pairs, cfg.seq_len
    return row


def _measure_preference(method: str, loss_type: str, head: str, inputs: PreferenceInputs,
                        ref: PreferenceReference, cfg: Config, meter: PeakMemory) -> Row:
    fn = preference_step_function(method, loss_type, cfg)
    if fn is None:
        return _preference_row(method, loss_type, head, cfg, f"n/a (no {loss_type.upper()} in liger-kernel)")
    row = _preference_row(method, loss_type, head, cfg, "ok")
    reference_logps = reference_logps_for(loss_type, inputs)

    def step() -> torch.Tensor:
        loss = fn(inputs.hidden, inputs.weight, inputs.targets, reference_logps)
        loss.backward()
        return loss

    def check(loss: torch.Tensor) -> bool:
        row.loss_err = _relative_error(loss.detach().reshape(1), ref.loss.reshape(1))
        row.grad_err = _relative_error(inputs.hidden.grad.reshape(ref.d_hidden.shape), ref.d_hidden)
        if head == "trainable":
            row.grad_err = max(row.grad_err, _relative_error(inputs.weight.grad, ref.d_weight))
        loss_tol, grad_tol = TOLERANCES[cfg.dtype]
        return row.loss_err <= loss_tol and row.grad_err <= grad_tol

    return _check_then_time(row, step, check, inputs, cfg, meter)


def run_preference(cfg: Config, progress: bool = True) -> List[Row]:
    """Every method on every loss in cfg.losses, for each head mode."""
    methods = preference_methods(cfg.backends)
    meter = PeakMemory(cfg.device)
    inputs = make_preference_inputs(cfg)
    bar = tqdm(total=len(cfg.losses) * len(cfg.heads) * len(methods), disable=None if progress else True, leave=False)
    with bar:
        return [row for loss_type in cfg.losses
                for row in _run_preference_loss(loss_type, methods, inputs, cfg, meter, bar)]


def _run_preference_loss(loss_type: str, methods: Sequence[str], inputs: PreferenceInputs, cfg: Config,
                         meter: PeakMemory, bar: tqdm) -> List[Row]:
    """One loss's rows; its reference's gradients are freed before the next loss computes its own."""
    bar.set_description(f"{loss_type} reference")
    ref = preference_reference(inputs, loss_type)
    rows = []
    for head in cfg.heads:
        for method in methods:
            bar.set_description(f"{method} {loss_type} ({head} head)")
            rows.append(_measure_or_oom(
                lambda: _measure_preference(method, loss_type, head, inputs, ref, cfg, meter),
                _preference_row(method, loss_type, head, cfg, "OOM"), head, inputs, cfg))
            bar.update()
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table; memory ratios are against the baseline with the same head (and loss)."""
    preference = any(r.loss is not None for r in rows)
    baseline_method = TRL if preference else BASELINE
    baseline = {(r.loss, r.head): r.peak_mib for r in rows if r.method == baseline_method and r.peak_mib}
    if preference:
        header = ["method", "loss", "head", "B", "T", "H", "V", "dtype", "time fwd+bwd (ms)",
                  "peak mem over inputs (MiB)", f"mem vs {TRL}", "loss rel err", "grad rel err"]
    else:
        header = ["method", "head", "N", "H", "V", "dtype", "time fwd+bwd (ms)",
                  "peak mem over inputs (MiB)", "mem vs baseline", "max abs dlogp", "grad rel err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if r.status.startswith("n/a"):  # the method has no such computation: say why once
            time_ms, peak, ratio = r.status, "n/a", "n/a"
        elif r.status != "ok":
            time_ms = peak = ratio = r.status
        else:
            time_ms = f"{r.time_ms:.1f}"
            peak = "n/a" if r.peak_mib is None else f"{r.peak_mib:.1f}"
            base = baseline.get((r.loss, r.head))
            ratio = "n/a" if r.peak_mib is None or base is None else f"{100 * r.peak_mib / base:.1f}%"
        if preference:
            shape = [r.method, r.loss, r.head, str(r.pairs), str(r.seq_len)]
            errors = (r.loss_err, r.grad_err)
        else:
            shape = [r.method, r.head, str(r.n)]
            errors = (r.logp_err, r.grad_err)
        cells = [*shape, str(r.hidden), str(r.vocab), r.dtype, time_ms, peak, ratio,
                 *("-" if e is None else f"{e:.2e}" for e in errors)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load_average() -> Optional[float]:
    """The 1-minute load average, or None off Linux."""
    try:
        with open("/proc/loadavg") as loadavg:
            return float(loadavg.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def format_report(rows: Sequence[Row], cfg: Config, command: str,
                  load: Sequence[Optional[float]] = ()) -> str:
    """The table with what it takes to reproduce and read it. `load`: the load averages before and
    after the run; above SHARED_LOAD the times are marked as taken on a shared machine."""
    if cfg.device.type == "cuda":
        memory = "CUDA max_memory_allocated() over memory_allocated() at the start of the run"
    elif _reset_resident_peak():
        memory = "process peak resident memory (VmHWM) over resident memory at the start of the run"
    else:
        memory = "n/a: needs /proc/self/clear_refs (Linux)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if cfg.op == "preference":
        title = "fastpref.PreferenceLoss: forward+backward benchmark"
        about = [
            f"- inputs: TRL's padded layout, B pairs = 2B rows of T tokens (chosen rows first); per row a"
            f" prompt of 1 to T/4 tokens and a response of T/4 tokens up to the rest of the row, both"
            f" other parts = {IGNORE_INDEX}; hidden ~ N(0, 1), weight ~ N(0, {LOGIT_STD}^2 / H);"
            f" beta = {BETA}, SimPO gamma = {SIMPO_GAMMA}; backward of the scalar loss",
            "- reference log-probs (precomputed, one per sequence): sigmoid rows use all zeros, because"
            " Liger-Kernel's DPO cannot take precomputed reference log-probs and with use_ref_model=False"
            " computes exactly that loss; ipo rows use the policy's log-probs plus N(0, 1) noise;"
            " simpo takes none",
            f"- methods: {TRL} = logits over the whole padded batch, float32 log-softmax, gather, masked"
            " sums per row (means for ipo and simpo), the loss in torch; liger = LigerFusedLinearDPOLoss"
            " (sigmoid, use_ref_model=False) and LigerFusedLinearSimPOLoss (compute_nll_loss=False),"
            f" compiled={cfg.device.type == 'cuda'}; fastpref-<backend> = fastpref.pack_padded +"
            " fastpref.PreferenceLoss",
        ]
        errors = (f"- loss rel err, grad rel err: against {TRL}'s math in float32, row-chunked"
                  " (grad: max |error| / max |reference|, over d_hidden and, for a trainable head, d_weight)")
    else:
        title = "fastpref.linear_logprobs: forward+backward benchmark"
        about = [f"- inputs: hidden ~ N(0, 1), weight ~ N(0, {LOGIT_STD}^2 / H), {IGNORED_FRACTION:.0%}"
                 f" of targets = {IGNORE_INDEX}, upstream gradient ~ N(0, 1)"]
        errors = ("- max abs dlogp, grad rel err: against a float32 row-chunked reference of the baseline's math"
                  " (grad: max |error| / max |reference|, over d_hidden and, for a trainable head, d_weight)")
    known = [value for value in load if value is not None]
    shared = []
    if known and max(known) > SHARED_LOAD:
        shared = [f"- note: the machine was shared with other jobs (load average {known[0]:.1f} before"
                  f" the run, {known[-1]:.1f} after, {os.cpu_count()} cores): times are noisy, peak"
                  " memory is not affected"]
    return "\n".join([
        f"# {title}",
        "",
        f"- device: {_device_name(cfg.device)}",
        f"- torch {torch.__version__}, triton {_triton_version()}, python {platform.python_version()}",
        f"- command: `{command}`",
        *shared,
        f"- date: {date}",
        *about,
        f"- time: median of {cfg.repeat} runs after {cfg.warmup} warm-up run(s) and the memory run",
        f"- peak memory: one run after the warm-up, {memory}; the input gradients are alive at"
        " the end of the run and count",
        errors,
        "",
        format_table(rows),
        "",
    ])


def run_and_report(cfg: Config, command: str, markdown: Optional[str] = None, progress: bool = True) -> int:
    """Run, print the report, write it to `markdown` if given; 1 if a method gave a wrong answer."""
    load_before = _load_average()
    rows = run(cfg, progress=progress)
    report = format_report(rows, cfg, command, load=(load_before, _load_average()))
    print(report)
    if markdown:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
    wrong = [f"{r.method} ({r.loss + ', ' if r.loss else ''}{r.head} head)" for r in rows if r.status == "WRONG"]
    if wrong:
        print(f"wrong answers (not timed): {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
