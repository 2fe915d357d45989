"""Op "loss-head": a whole preference loss from the last hidden states, forward and backward.

Each method gets TRL's padded batch: hidden [2B, T, H] (chosen rows first), the head W [V, H]
and targets [2B, T], where each row is a prompt of 1 to T/4 tokens (target -100) and a response
filling the rest; N = 2 B T tokens, of which N_scored are response tokens. From them it computes
the per-sequence log-probs log pi(y|x) = sum_t log softmax(W h_t)[y_t], the loss over the pairs,
and the loss's gradients w.r.t. hidden (and W when the head is trainable).

Methods:
  materialized   the standard computation (TRL before 1.16): the [2B, T, V] logits, float32
                 log-softmax, gather, masked sums.
  trl            TRL >= 1.16's own kernel, trl.kernels.ChunkedLogProbFunction (vocabulary tiles through
                 cuBLAS, a Triton online log-sum-exp; torch ops off Triton devices) on the response
                 tokens, the loss in torch.
  liger          Liger-Kernel's LigerFusedLinearDPOLoss / LigerFusedLinearSimPOLoss (no IPO there).
  cce            Cut Cross-Entropy's linear_cross_entropy(reduction="none") for per-token log-probs
                 (its Triton kernel on CUDA, its torch.compile version elsewhere), the loss in torch.
  torch-native   PyTorch's chunked head, F.linear_cross_entropy(reduction="none",
                 options=LinearCrossEntropyOptions()) (torch >= 2.13), on the response tokens, the
                 loss in torch.
  liger-cute     Liger-Kernel's Hopper CuTe DSL per-token head (sm_90, bf16), on the response
                 tokens, the loss in torch.
  quack          QuACK's per-token path (cuBLAS logits, QuACK's cross-entropy kernels; sm_90+), on
                 the response tokens, the loss in torch. (QuACK's chunked head returns one summed
                 loss, its gradient taken in the forward: it cannot weight tokens by sequence, so it
                 has no DPO row; `fastpref bench logprobs` measures it.)
  A peer that cannot run here (its package, GPU or dtype) is a row that says why.
  fastpref-<b>   fastpref.pack_padded + fastpref.PreferenceLoss on backend b.
  fastpref-torch-two-op  on a CPU, the same with gradients_in_forward=False: the log-prob op,
                 then the loss, the logits recomputed in the backward (the least memory).
  fastpref-cuda-in-forward  on a GPU, backend "cuda" with gradients_in_forward=True: the loss's
                 gradients computed in the forward, group of pairs by group (6 N_scored H V,
                 2,048 rows of logits held, a float32 weight gradient); trainable head only.

The FLOP floor of a step is 8 N_scored H V with a trainable head (logits, their recomputation in
the backward, d_hidden, d_weight) and 4 N_scored H V with a frozen one; TFLOP/s divides that floor
by the time. A method that keeps the logits instead of recomputing them does 6 N_scored H V for a
trainable head (CCE's torch.compile path materializes them; fastpref's CPU loss and
fastpref-cuda-in-forward keep a group of pairs' worth, fastpref.head_loss): its TFLOP/s is then the rate of the work the others do. The memory floor is the gradients the step must leave behind (d_hidden, and d_weight
for a trainable head); "extra" is the peak over the inputs minus that floor.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import fastpref

from ..loss_types import PAIRED, Hyper, Pairs
from . import options, peers
from .measure import (MIB, Candidate, Progress, build_candidates, is_failure, measure_rows, memory_method,
                      runs_per_method, timing_note)
from .reference import (DTYPES, IGNORE_INDEX, LOGIT_STD, TOLERANCES, dtype_name, float32_logprobs, head_flop_floor,
                        materialized_logprobs, random_head, relative_error, tflops, token_reference)
from .report import MachineLoad, header, markdown_table, number

NAME = "loss-head"
TITLE = "Preference loss from hidden states: forward+backward benchmark"
HELP = ("DPO/IPO/SimPO from hidden states: materialized vs TRL, Liger-Kernel, Cut Cross-Entropy, PyTorch's and "
        "QuACK's heads vs fastpref")
MATERIALIZED, TRL, LIGER, CCE = "materialized", "trl", "liger", "cce"
PEERS = (MATERIALIZED, TRL, LIGER, CCE, peers.TORCH_NATIVE, peers.LIGER_CUTE, peers.QUACK)
# The suffixes of the fastpref methods that choose the path: the CPU's two-op one
# (PreferenceLoss(gradients_in_forward=False)) and the GPU's gradients in the forward (=True).
TWO_OP = "-two-op"
IN_FORWARD = "-in-forward"
# The vocabulary tile TRL's DPOTrainer hands its kernel.
TRL_CHUNK_SIZE = 32768
LOSSES = ("sigmoid", "ipo", "simpo")
BETA = 0.1
SIMPO_GAMMA = 0.5
# LM heads (hidden size, vocabulary) of models people train; "small" keeps a CPU run short.
HEAD_SHAPES: Dict[str, Tuple[int, int]] = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
    "small": (256, 16384),
}


def defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(models=["llama3-8b", "qwen2.5-7b", "gemma2-2b"], tokens=[4096, 16384, 65536],
                    seq_len=1024, losses=["sigmoid"], dtype="bfloat16", warmup=2, repeat=5)
    return dict(models=["small"], tokens=[1024, 2048, 4096], seq_len=256, losses=["sigmoid"],
                dtype="float32", warmup=1, repeat=2)


@dataclass
class Config:
    device: torch.device
    models: Sequence[str]
    tokens: Sequence[int]
    seq_len: int
    losses: Sequence[str]
    dtype: torch.dtype
    backends: Sequence[str]
    peers: Sequence[str] = PEERS
    heads: Sequence[str] = options.HEADS
    warmup: int = 1
    repeat: int = 2
    seed: int = 0
    shapes: Optional[Dict[str, Tuple[int, int]]] = None  # name -> (H, V); HEAD_SHAPES when None
    hidden_from: Optional[str] = None  # a model whose real hidden states and head are the inputs

    def head_shape(self, model: str) -> Tuple[int, int]:
        return (self.shapes or HEAD_SHAPES)[model]


@dataclass
class Row:
    model: str
    method: str
    loss: str
    head: str
    n: int          # tokens in the batch, 2 B T
    scored: int     # response tokens among them
    hidden: int
    vocab: int
    dtype: str
    status: str = "ok"  # ok, OOM, WRONG, "ERROR: <type>: <message>", or "n/a (why)"
    time_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    extra_mib: Optional[float] = None
    tflops: Optional[float] = None
    loss_err: Optional[float] = None
    grad_err: Optional[float] = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="models", nargs="+", choices=sorted(HEAD_SHAPES),
                        help="LM-head shapes to measure (default: Llama-3-8B, Qwen2.5-7B, Gemma-2-2B on a GPU,"
                             " a small head on a CPU)")
    parser.add_argument("--hidden", type=options.positive_int,
                        help="with --vocab, measure this head shape instead of --model")
    parser.add_argument("--vocab", type=options.positive_int, help="with --hidden: vocabulary size V")
    parser.add_argument("--hidden-from", metavar="MODEL",
                        help="instead of random inputs, the real final hidden states and LM head of MODEL (a "
                             "named model such as gemma3-270m, or a local Hugging Face folder) on the bundled "
                             "HH-RLHF pairs")
    parser.add_argument("--tokens", nargs="+", type=options.positive_int,
                        help="batch sizes N in tokens, each a multiple of 2 * --seq-len")
    parser.add_argument("--seq-len", type=options.positive_int, help="tokens T per sequence")
    parser.add_argument("--loss", dest="losses", nargs="+", choices=LOSSES, help="losses (default: sigmoid)")
    parser.add_argument("--peers", nargs="*", choices=PEERS,
                        help=f"other methods to measure (default: all of {', '.join(PEERS)})")
    options.add_common_arguments(parser)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = options.device_from_args(args, parser)
    chosen = defaults(device)
    for name in ("models", "tokens", "seq_len", "losses", "dtype", "warmup", "repeat"):
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    shapes = None
    if (args.hidden is None) != (args.vocab is None):
        parser.error("--hidden and --vocab go together")
    if sum(given is not None for given in (args.models, args.hidden, args.hidden_from)) > 1:
        parser.error("give one of --model, --hidden/--vocab and --hidden-from")
    if args.hidden is not None:
        name = "custom"
        shapes, chosen["models"] = {name: (args.hidden, args.vocab)}, [name]
    if args.hidden_from is not None:
        chosen["models"] = [args.hidden_from]
    if chosen["seq_len"] < 2:
        parser.error("--seq-len must be at least 2: a prompt token and a response token")
    for tokens in chosen["tokens"]:
        if tokens % (2 * chosen["seq_len"]):
            parser.error(f"--tokens: {tokens} is not a multiple of 2 * --seq-len = {2 * chosen['seq_len']}"
                         " (a batch is whole pairs of sequences)")
    return Config(device=device, models=list(dict.fromkeys(chosen["models"])),
                  tokens=sorted(set(chosen["tokens"])), seq_len=chosen["seq_len"],
                  losses=list(dict.fromkeys(chosen["losses"])), dtype=DTYPES[chosen["dtype"]],
                  backends=options.backends_from_args(args, parser, device),
                  peers=PEERS if args.peers is None else list(dict.fromkeys(args.peers)),
                  heads=options.heads_from_args(args), warmup=chosen["warmup"], repeat=chosen["repeat"],
                  shapes=shapes, hidden_from=args.hidden_from)


# ---------------------------------------------------------------------------------------------
# Inputs and the reference


@dataclass
class Inputs:
    hidden: torch.Tensor        # [2B, T, H], requires grad
    weight: torch.Tensor        # [V, H]; requires grad for the trainable head
    targets: torch.Tensor       # [2B, T]: IGNORE_INDEX over each row's prompt
    policy_logps: torch.Tensor  # [2B] float32 summed response log-probs

    @property
    def scored(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def clear_grads(self) -> None:
        self.hidden.grad = self.weight.grad = None


def make_inputs(pairs: int, seq_len: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> Inputs:
    """Random pairs; hidden ~ N(0, 1), weight ~ N(0, LOGIT_STD^2 / H)."""
    gen = torch.Generator(device).manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq_len, hidden_size, dtype=dtype, device=device, generator=gen)
    weight = random_head(vocab, hidden_size, dtype, gen, device)
    targets = torch.randint(0, vocab, (rows, seq_len), device=device, generator=gen)
    prompt = torch.randint(1, max(2, seq_len // 4 + 1), (rows, 1), device=device, generator=gen)
    targets[torch.arange(seq_len, device=device) < prompt] = IGNORE_INDEX
    policy_logps = float32_logprobs(hidden, weight, targets).sum(-1)
    return Inputs(hidden.requires_grad_(), weight, targets, policy_logps)


def real_inputs(model: str, pairs: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """The real final hidden states and LM head of `model` on HH-RLHF pairs (see real_hidden)."""
    from .real_hidden import real_batch

    hidden, weight, targets = real_batch(model, pairs, seq_len, dtype, device)
    return Inputs(hidden.requires_grad_(), weight, targets, float32_logprobs(hidden, weight, targets).sum(-1))


def reference_logps_for(loss_type: str, inputs: Inputs) -> Optional[torch.Tensor]:
    """The precomputed reference log-probs each loss gets. SimPO takes none. Sigmoid uses a zero
    reference, the only one Liger-Kernel's DPO accepts without running a reference model
    (use_ref_model=False); what the reference holds costs nothing either way. IPO gets a reference
    close to the policy, as at the start of training."""
    if loss_type == "simpo":
        return None
    if loss_type == "sigmoid":
        return torch.zeros_like(inputs.policy_logps)
    gen = torch.Generator(inputs.policy_logps.device).manual_seed(1)
    noise = torch.randn(inputs.policy_logps.shape, generator=gen, device=inputs.policy_logps.device)
    return inputs.policy_logps + noise


def trl_pair_loss(seq_logps: torch.Tensor, lengths: torch.Tensor, reference_logps: Optional[torch.Tensor],
                  loss_type: str) -> torch.Tensor:
    """TRL's loss from [2B] summed response log-probs (chosen first), averaged over pairs: the
    formula of fastpref.loss_types, which is TRL's (IPO and SimPO per response token)."""
    chosen, rejected = seq_logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.to(seq_logps.dtype).chunk(2)
    ref_chosen, ref_rejected = (None, None) if reference_logps is None else reference_logps.chunk(2)
    pairs = Pairs(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
                  -chosen.sum() / chosen_lengths.sum(), Hyper(beta=BETA, simpo_gamma=SIMPO_GAMMA))
    return PAIRED[loss_type].loss(pairs).mean()


def materialized_loss(hidden, weight, targets, reference_logps, loss_type: str) -> torch.Tensor:
    """TRL's computation: logits over the whole padded batch, masked sums per row, the formula."""
    logp = materialized_logprobs(hidden, weight, targets)
    return trl_pair_loss(logp.sum(-1), (targets != IGNORE_INDEX).sum(-1), reference_logps, loss_type)


@dataclass
class LossReference:
    loss: torch.Tensor
    d_hidden: torch.Tensor  # [2B * T, H] float32
    d_weight: torch.Tensor  # [V, H] float32


def loss_reference(inputs: Inputs, loss_type: str) -> LossReference:
    """TRL's math in float32, in two passes so that it fits wherever the methods do: the loss and
    its gradient w.r.t. each sequence's log-prob, then the row-chunked token reference driven by
    that gradient on every response token of the sequence."""
    lengths = (inputs.targets != IGNORE_INDEX).sum(-1)
    seq_logps = inputs.policy_logps.clone().requires_grad_()
    loss = trl_pair_loss(seq_logps, lengths, reference_logps_for(loss_type, inputs), loss_type)
    (d_seq,) = torch.autograd.grad(loss, seq_logps)
    hidden_size = inputs.hidden.shape[-1]
    ref = token_reference(inputs.hidden.reshape(-1, hidden_size), inputs.weight, inputs.targets.reshape(-1),
                          d_seq.unsqueeze(1).expand(inputs.targets.shape).reshape(-1))
    return LossReference(loss.detach(), ref.d_hidden, ref.d_weight)


# ---------------------------------------------------------------------------------------------
# Methods


LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def loss_function(method: str, loss_type: str, head: str, device: torch.device,
                  dtype: torch.dtype) -> Union[LossFunction, str]:
    """(hidden [2B, T, H], weight, targets [2B, T], reference_logps) -> scalar loss, or the reason
    the method cannot compute this loss here."""
    if method in peers.PER_TOKEN:
        return _per_token_peer_loss(peers.PER_TOKEN[method](device, dtype), loss_type)
    if method == MATERIALIZED:
        return lambda h, w, t, r: materialized_loss(h, w, t, r, loss_type)
    if method == TRL:
        return _trl_loss(loss_type)
    if method == LIGER:
        return liger_loss(loss_type, device)
    if method == CCE:
        return _cce_loss(loss_type, device)
    backend, gradients_in_forward = method[len("fastpref-"):], None
    for suffix, choice in ((TWO_OP, False), (IN_FORWARD, True)):
        if backend.endswith(suffix):
            backend, gradients_in_forward = backend[:-len(suffix)], choice
    if gradients_in_forward and head == "frozen":
        return "n/a (a frozen head has no weight gradient to compute in the forward: it costs 4NHV either way)"
    module = fastpref.PreferenceLoss(loss_type, beta=BETA, simpo_gamma=SIMPO_GAMMA, backend=backend,
                                     gradients_in_forward=gradients_in_forward)

    def fastpref_loss(h, w, t, r):
        batch = fastpref.pack_padded(h, t, ignore_index=IGNORE_INDEX)
        return module(batch.hidden, w, batch.targets, batch.layout, r)[0]

    return fastpref_loss


def _trl_loss(loss_type: str) -> Union[LossFunction, str]:
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return "n/a (needs trl >= 1.16)"

    def trl_loss(h, w, t, r):
        flat_targets = t.reshape(-1)
        scored = flat_targets != IGNORE_INDEX
        logp = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1])[scored], w, None, flat_targets[scored],
                                            1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]
        per_token = logp.new_zeros(flat_targets.shape).masked_scatter(scored, logp).view(t.shape)
        return trl_pair_loss(per_token.float().sum(-1), (t != IGNORE_INDEX).sum(-1), r, loss_type)

    return trl_loss


def _per_token_peer_loss(logprobs: Union[peers.LogprobFunction, str], loss_type: str) -> Union[LossFunction, str]:
    """A per-token head on the response tokens, TRL's loss in torch."""
    if isinstance(logprobs, str):
        return logprobs
    scored_logprobs = peers.on_scored_rows(logprobs)

    def peer_loss(h, w, t, r):
        return trl_pair_loss(scored_logprobs(h, w, t).sum(-1), (t != IGNORE_INDEX).sum(-1), r, loss_type)

    return peer_loss


def liger_loss(loss_type: str, device: torch.device) -> Union[LossFunction, str]:
    """Liger-Kernel's chunked loss for `loss_type` as a LossFunction, or why there is none."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss
    except ImportError:
        return "n/a (liger-kernel not installed)"
    compiled = device.type == "cuda"  # torch.compile of its chunk step needs a GPU to pay off
    if loss_type == "sigmoid":
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=compiled, loss_type="sigmoid")
    elif loss_type == "simpo":
        liger = LigerFusedLinearSimPOLoss(beta=BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False, compiled=compiled)
    else:
        return f"n/a (no {loss_type.upper()} in liger-kernel)"
    return lambda h, w, t, r: liger(w, h, t)[0]


def cce_impl(device: torch.device) -> str:
    return "cce" if device.type == "cuda" else "torch_compile"


def _cce_loss(loss_type: str, device: torch.device) -> Union[LossFunction, str]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return "n/a (cut-cross-entropy not installed)"
    impl = cce_impl(device)

    def cce_loss(h, w, t, r):
        nll = linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)
        return trl_pair_loss(-nll.float().sum(-1), (t != IGNORE_INDEX).sum(-1), r, loss_type)

    return cce_loss


def methods(cfg: Config) -> List[str]:
    variants = [f"fastpref-{name}" for name in cfg.backends]
    if cfg.device.type == "cpu" and "torch" in cfg.backends:
        variants.insert(variants.index("fastpref-torch") + 1, f"fastpref-torch{TWO_OP}")
    if cfg.device.type == "cuda" and "cuda" in cfg.backends:
        variants.insert(variants.index("fastpref-cuda") + 1, f"fastpref-cuda{IN_FORWARD}")
    return list(cfg.peers) + variants


# ---------------------------------------------------------------------------------------------
# Running


def group_work(cfg: Config, model: str, tokens: int, head: str) -> float:
    """One group's measurements (a head shape, N, loss and head mode), in the units of
    planned_work: every method's runs at the head's FLOP floor. A model's real head is the only
    one measured in its run, so its shape, unknown until it is loaded, drops out."""
    hidden, vocab = (1, 1) if cfg.hidden_from is not None else cfg.head_shape(model)
    return len(methods(cfg)) * runs_per_method(cfg.warmup, cfg.repeat) * head_flop_floor(tokens, hidden, vocab, head)


def planned_work(cfg: Config) -> float:
    """What run will advance its Progress by in all."""
    return len(cfg.losses) * sum(group_work(cfg, model, tokens, head) for model in cfg.models
                                 for tokens in cfg.tokens for head in cfg.heads)


def run(cfg: Config, rows: List[Row], progress: Progress = Progress()) -> None:
    """Append rows to `rows` for every head shape, N, loss and head mode, as each group finishes."""
    for model in cfg.models:
        for tokens in cfg.tokens:
            pairs = tokens // (2 * cfg.seq_len)
            if cfg.hidden_from is not None:
                progress.describe(f"{model} N={tokens}: hidden states from the model")
                inputs = real_inputs(model, pairs, cfg.seq_len, cfg.dtype, cfg.device)
            else:
                inputs = make_inputs(pairs, cfg.seq_len, *cfg.head_shape(model), cfg.dtype, cfg.device, cfg.seed)
            for loss_type in cfg.losses:
                where = f"{model} N={tokens} {loss_type}"
                progress.describe(f"{where}: reference")
                ref = loss_reference(inputs, loss_type)
                for head in cfg.heads:
                    rows.extend(_measure_group(model, loss_type, head, inputs, ref, cfg,
                                               progress.within(f"{where} {head}"),
                                               group_work(cfg, model, tokens, head)))
                del ref
            del inputs


def _measure_group(model: str, loss_type: str, head: str, inputs: Inputs, ref: LossReference, cfg: Config,
                   progress: Progress, work: float) -> List[Row]:
    inputs.weight.requires_grad_(head == "trainable")
    group = [Row(model, method, loss_type, head, inputs.targets.numel(), inputs.scored, inputs.hidden.shape[-1],
                 inputs.weight.shape[0], dtype_name(cfg.dtype)) for method in methods(cfg)]

    def build(row: Row):
        fn = loss_function(row.method, loss_type, head, cfg.device, cfg.dtype)
        return fn if isinstance(fn, str) else _candidate(row, fn, inputs, ref, cfg.dtype)

    measured, candidates = build_candidates(group, build)
    measure_rows(measured, candidates, cfg.device, cfg.warmup, cfg.repeat, progress, work)
    for row in measured:
        if row.status == "ok":
            _derive(row, inputs)
    inputs.weight.requires_grad_(False)
    return group


def _candidate(row: Row, fn: LossFunction, inputs: Inputs, ref: LossReference, dtype: torch.dtype) -> Candidate:
    reference_logps = reference_logps_for(row.loss, inputs)

    def step() -> torch.Tensor:
        loss = fn(inputs.hidden, inputs.weight, inputs.targets, reference_logps)
        loss.backward()
        return loss

    def check(loss: torch.Tensor) -> bool:
        row.loss_err = relative_error(loss.detach().reshape(1), ref.loss.reshape(1))
        row.grad_err = relative_error(inputs.hidden.grad.reshape(ref.d_hidden.shape), ref.d_hidden)
        if row.head == "trainable":
            row.grad_err = max(row.grad_err, relative_error(inputs.weight.grad, ref.d_weight))
        loss_tol, grad_tol = TOLERANCES[dtype]
        return row.loss_err <= loss_tol and row.grad_err <= grad_tol

    return Candidate(row.method, step, check, inputs.clear_grads)


def _derive(row: Row, inputs: Inputs) -> None:
    row.tflops = tflops(head_flop_floor(row.scored, row.hidden, row.vocab, row.head), row.time_ms)
    if row.peak_mib is not None:
        floor = inputs.hidden.numel() * inputs.hidden.element_size()
        if row.head == "trainable":
            floor += inputs.weight.numel() * inputs.weight.element_size()
        row.extra_mib = row.peak_mib - floor / MIB


# ---------------------------------------------------------------------------------------------
# Report


def format_table(rows: Sequence[Row]) -> str:
    """Memory ratios are against the materialized method on the same shape, loss and head."""
    baseline = {(r.model, r.n, r.loss, r.head): r.peak_mib for r in rows if r.method == MATERIALIZED and r.peak_mib}
    columns = ["head shape", "N", "loss", "head", "method", "time fwd+bwd (ms)", "TFLOP/s", "peak mem (MiB)",
               "extra over floor (MiB)", "mem vs materialized", "loss rel err", "grad rel err"]
    cells = []
    for r in rows:
        shape = [f"{r.model} (H={r.hidden}, V={r.vocab})", str(r.n), r.loss, r.head, r.method]
        if r.status != "ok":
            measured = [r.status] + ["-"] * 5
        else:
            base = baseline.get((r.model, r.n, r.loss, r.head))
            ratio = "n/a" if r.peak_mib is None or base is None else f"{100 * r.peak_mib / base:.1f}%"
            measured = [number(r.time_ms), number(r.tflops, 2), number(r.peak_mib), number(r.extra_mib), ratio]
        errors = ["-" if e is None else f"{e:.1e}" for e in (r.loss_err, r.grad_err)]
        cells.append([*shape, *measured, *errors])
    return markdown_table(columns, cells)


def format_report(rows: Sequence[Row], cfg: Config, command: str, machine: Optional[MachineLoad] = None) -> str:
    if cfg.hidden_from is None:
        inputs = (f"inputs: TRL's padded batch of N = 2 B T tokens, T = {cfg.seq_len}: per row a prompt of 1 to"
                  f" T/4 tokens (target {IGNORE_INDEX}) and a response to the end of the row; hidden ~ N(0, 1),"
                  f" weight ~ N(0, {LOGIT_STD}^2 / H)")
    else:
        inputs = (f"inputs: the final hidden states and LM-head weight of {cfg.hidden_from} on the first B pairs"
                  " of the bundled HH-RLHF sample that fit T tokens, in TRL's padded batch of N = 2 B T tokens,"
                  f" T = {cfg.seq_len}: per row prompt + response, right-padded; targets {IGNORE_INDEX} on the"
                  " prompt and the padding")
    notes = [
        f"{inputs}; {dtype_name(cfg.dtype)}; beta = {BETA}, SimPO gamma = {SIMPO_GAMMA}; backward of the"
        " scalar loss",
        "reference log-probs (precomputed): zeros for sigmoid (the only reference Liger-Kernel's DPO takes"
        " without a reference model), the policy's log-probs plus N(0, 1) noise for ipo, none for simpo",
        f"methods: {MATERIALIZED} = [2B, T, V] logits, float32 log-softmax, gather, masked sums (TRL before 1.16);"
        f" {TRL} = trl.kernels.ChunkedLogProbFunction on the response tokens (vocabulary tile {TRL_CHUNK_SIZE},"
        " as TRL's DPOTrainer) + the loss in torch;"
        f" {LIGER} = LigerFusedLinearDPOLoss / LigerFusedLinearSimPOLoss (compiled={cfg.device.type == 'cuda'});"
        f" {CCE} = cut_cross_entropy.linear_cross_entropy(reduction='none', impl='{cce_impl(cfg.device)}')"
        " + the loss in torch;"
        f" {peers.TORCH_NATIVE} = torch.nn.functional.linear_cross_entropy(reduction='none',"
        f" options=torch.nn.LinearCrossEntropyOptions()), {peers.LIGER_CUTE} = Liger-Kernel's"
        f" LigerFusedLinearScaledCrossEntropyFunction on its sm_90 CuTe head, {peers.QUACK} = QuACK's"
        " linear_cross_entropy_func(reduction='none'): each on the response tokens + the loss in torch;"
        " fastpref-<backend> = fastpref.pack_padded + fastpref.PreferenceLoss (on a CPU its trainable head"
        " computes the gradients in the forward, fastpref.head_loss); fastpref-torch-two-op = the same with"
        " gradients_in_forward=False (the log-prob op, then the loss); fastpref-cuda-in-forward = backend cuda with"
        " gradients_in_forward=True (on a GPU)",
        "TFLOP/s: the FLOP floor 8 N_scored H V (trainable head) or 4 N_scored H V (frozen head) over the"
        " time, N_scored = response tokens (a method that keeps the logits rather than recomputing them,"
        " as cce on a CPU and fastpref-torch's loss on a CPU do, does 6 N_scored H V for a trainable head)",
        timing_note(cfg.warmup, cfg.repeat),
        f"peak memory: one run after the warm-up, {memory_method(cfg.device)}; extra over floor = peak minus"
        " the gradients the step leaves (d_hidden, and d_weight for a trainable head)",
        "loss rel err, grad rel err: against the materialized math in float32, row-chunked (grad: max"
        " |error| / max |reference| over d_hidden and, for a trainable head, d_weight); OOM = ran out of memory; ERROR = the method raised (type and message shown)",
    ]
    return "\n".join([*header(TITLE, cfg.device, command, machine, notes), format_table(rows), ""])


def failures(rows: Sequence[Row]) -> List[str]:
    return [f"{r.method} ({r.model}, N={r.n}, {r.loss}, {r.head} head): {r.status}" for r in rows
            if is_failure(r.status)]


def plot(rows: Sequence[Row], cfg: Config, path) -> None:
    """Time and peak memory of each method, a row of panels per head shape, for the first loss
    measured: against N when several were measured (out-of-memory points left out and named in
    the legend), else a bar per method."""
    from .plots import method_figure

    loss_type = cfg.losses[0]
    chosen = [r for r in rows if r.loss == loss_type and not r.status.startswith("n/a")]
    method_figure(chosen, path, panel_rows=list(dict.fromkeys(r.model for r in chosen)),
                  panel_of=lambda r: r.model, x_of=lambda r: r.n, x_label="N (tokens)",
                  title=f"{loss_type} loss from hidden states, {dtype_name(cfg.dtype)}, {cfg.device.type}")
