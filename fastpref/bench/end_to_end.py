"""Op "end-to-end": one DPO training step of a causal LM, forward and backward.

A Llama model with random weights (1B-class on a GPU, a tiny one on a CPU) takes a step on
random preference pairs: a prompt of seq_len/4 to seq_len/2 tokens and two responses of one
length, drawn per pair, up to the rest of seq_len. The reference log-probs are precomputed (zeros,
the only reference Liger-Kernel's DPO takes without a reference model; their value costs
nothing), so the step is the policy's forward, the loss, and the backward into every parameter.
Responses of one length keep the loss near log 2, as at the start of training, rather than
saturated by a length difference, so that the check of every method's loss and gradient against
trl-padded's means something.

Methods:
  trl-padded               the standard computation: TRL's concatenated [2P, L] right-padded rows,
                           the model's full [2P, L, V] logits, float32 log-softmax, gather, sums.
  trl-dpotrainer           trl.DPOTrainer.compute_loss on its own collated batch: the padded forward
                           with TRL's tiled fused LM head (TRL >= 1.16 no longer builds full logits;
                           off Triton devices that head scores every position, padding included);
                           its gradient checkpointing and bf16 autocast off, like every other method.
  liger                    the padded forward to the last hidden states, then Liger-Kernel's
                           LigerFusedLinearDPOLoss on the LM head.
  fastpref-packed          fastpref's trainer step: [prompt | chosen] and [prompt | rejected] of every
                           pair packed into one padding-free stream, fastpref.PreferenceLoss.
  fastpref-packed-prefix   the same with the prompt shared: [prompt | chosen | rejected] per pair.
  fastpref-dpotrainer      fastpref.integrations.trl.FastprefDPOTrainer.compute_loss on TRL's batch:
                           the drop-in, TRL's padded forward with fastpref's fused loss.

Attention: padded methods use sdpa (flash_attention_2 where flash-attn is installed); packed ones
FlexAttention with a block mask on CUDA, sdpa with a dense additive mask on a CPU.
tokens/s counts the real tokens of both sequences of every pair (2 x prompt + chosen + rejected),
the same for every method: padding is not counted, and prefix sharing gets no credit for the
prompt it skips. "max pairs" is the largest number of pairs per step that fits: in the GPU's
memory (doubling until out-of-memory, then bisecting), or on a CPU under --memory-budget-mib.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastpref

from ..causal_lm import causal_lm_parts
from ..train.model import packed_hidden
from ..train.data import TokenizedPair
from ..train.named_models import NAMED_MODELS, resolve_model
from ..train.reference import default_cache_dir
from ..train.packing import pack_pairs
from . import options
from .loss_head import BETA, liger_loss, trl_pair_loss
from .measure import (Candidate, PeakMemory, Progress, build_candidates, error_status, is_failure, is_out_of_memory,
                      measure_rows, memory_method, release_memory, runs_per_method, timing_note)
from .reference import DTYPES, IGNORE_INDEX, dtype_name, logprobs_from_logits
from .report import MachineLoad, header, markdown_table, number

NAME = "end-to-end"
TITLE = "One DPO training step: end-to-end benchmark"
HELP = "one DPO step of a Llama model: TRL-style padded vs Liger-Kernel vs fastpref packed"
TRL_PADDED, TRL_TRAINER, LIGER = "trl-padded", "trl-dpotrainer", "liger"
PACKED, PACKED_PREFIX, FASTPREF_TRAINER = "fastpref-packed", "fastpref-packed-prefix", "fastpref-dpotrainer"
METHODS = (TRL_PADDED, TRL_TRAINER, LIGER, PACKED, PACKED_PREFIX, FASTPREF_TRAINER)
TRAINER_METHODS = (TRL_TRAINER, FASTPREF_TRAINER)
# Llama configurations: Llama-3.2-1B's shape, and a tiny one for CPUs.
MODEL_PRESETS: Dict[str, dict] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True, rope_theta=10000.0),
}
# A loss or gradient norm differing from trl-padded's by more than this (relative) marks the
# method WRONG.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(model="llama-1b", seq_lens=[1024, 4096], pairs=[2, 4, 8], dtype="bfloat16", warmup=2, repeat=5,
                    memory_budget_mib=None, max_pairs_limit=64)
    return dict(model="llama-tiny", seq_lens=[256], pairs=[1, 2, 4], dtype="float32", warmup=1, repeat=2,
                memory_budget_mib=512.0, max_pairs_limit=32)


@dataclass
class Config:
    device: torch.device
    model: str
    seq_lens: Sequence[int]
    pairs: Sequence[int]
    dtype: torch.dtype
    methods: Sequence[str] = METHODS
    warmup: int = 1
    repeat: int = 2
    seed: int = 0
    find_max_pairs: bool = True
    memory_budget_mib: Optional[float] = None  # None: until the device runs out of memory (CUDA only)
    max_pairs_limit: int = 64


@dataclass
class Row:
    model: str
    method: str
    seq_len: int
    pairs: int
    tokens: int  # real tokens of both sequences of every pair
    dtype: str
    status: str = "ok"
    time_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mib: Optional[float] = None
    loss: Optional[float] = None
    grad_norm: Optional[float] = None  # of all the model's gradients after the step
    loss_err: Optional[float] = None   # relative to trl-padded's
    grad_err: Optional[float] = None   # relative difference of the gradient norms
    max_pairs: Optional[str] = None  # "37", or ">= 64" at the search limit; None when not searched


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS) + sorted(NAMED_MODELS),
                        help="Llama configuration with random weights, or a packaged real model by name "
                             "(default: llama-1b on a GPU, llama-tiny on a CPU)")
    parser.add_argument("--seq-len", dest="seq_lens", nargs="+", type=options.positive_int,
                        help="longest sequence (prompt + response) of a pair, in tokens; at least 8")
    parser.add_argument("--pairs", nargs="+", type=options.positive_int, help="pairs per step to measure")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods (default: all)")
    parser.add_argument("--no-max-pairs", dest="find_max_pairs", action="store_false",
                        help="skip the search for the largest pairs per step that fits")
    parser.add_argument("--memory-budget-mib", type=options.positive_float,
                        help="a step fits when its peak memory is at most this (default on a CPU: 512;"
                             " on a GPU: whatever does not run out of memory)")
    parser.add_argument("--max-pairs-limit", type=options.positive_int,
                        help="stop the max-pairs search here (default: 64 on a GPU, 32 on a CPU)")
    options.add_common_arguments(parser, backends=False)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = options.device_from_args(args, parser)
    chosen = defaults(device)
    for name in ("model", "seq_lens", "pairs", "dtype", "warmup", "repeat", "memory_budget_mib", "max_pairs_limit"):
        if getattr(args, name, None) is not None:
            chosen[name] = getattr(args, name)
    if min(chosen["seq_lens"]) < 8:
        parser.error("--seq-len must be at least 8: a prompt and two responses of two tokens or more")
    if device.type == "cpu" and args.find_max_pairs and chosen["memory_budget_mib"] is None:
        parser.error("--memory-budget-mib is needed on a CPU to search for the largest pairs per step")
    return Config(device=device, model=chosen["model"], seq_lens=sorted(set(chosen["seq_lens"])),
                  pairs=sorted(set(chosen["pairs"])), dtype=DTYPES[chosen["dtype"]],
                  methods=list(dict.fromkeys(args.methods or METHODS)), warmup=chosen["warmup"],
                  repeat=chosen["repeat"], find_max_pairs=args.find_max_pairs,
                  memory_budget_mib=chosen["memory_budget_mib"], max_pairs_limit=chosen["max_pairs_limit"])


# ---------------------------------------------------------------------------------------------
# Model and data


def build_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if preset in NAMED_MODELS:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(preset, default_cache_dir()), dtype=dtype,
                                                     local_files_only=True).to(device)
        model.train()
        return model
    config = LlamaConfig(**MODEL_PRESETS[preset], max_position_embeddings=16384)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.train()
    return model


@dataclass(frozen=True)
class Pair(TokenizedPair):
    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def make_pairs(count: int, seq_len: int, vocab: int, seed: int = 0) -> List[Pair]:
    """Prompts of seq_len/4 to seq_len/2 tokens; both responses of one length, 2 tokens up to the
    rest of seq_len."""
    gen = torch.Generator().manual_seed(seed)

    def between(low: int, high: int) -> int:
        return int(torch.randint(low, max(low, high) + 1, (1,), generator=gen))

    def tokens(length: int) -> List[int]:
        return torch.randint(0, vocab, (length,), generator=gen).tolist()

    pairs = []
    for row in range(count):
        prompt = between(seq_len // 4, seq_len // 2)
        response = between(2, seq_len - prompt)
        pairs.append(Pair(tokens(prompt), tokens(response), tokens(response), row))
    return pairs


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor       # [2P, L], chosen rows first, right-padded
    attention_mask: torch.Tensor  # [2P, L]
    targets: torch.Tensor         # [2P, L]: the next token where it is a response token, else IGNORE_INDEX


def pad_pairs(pairs: Sequence[Pair], device: torch.device) -> PaddedBatch:
    """TRL's concatenated batch: every chosen sequence, then every rejected one, right-padded."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    length = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        ids = torch.tensor(prompt + response)
        input_ids[row, :ids.numel()] = ids
        attention_mask[row, :ids.numel()] = 1
        targets[row, len(prompt) - 1:ids.numel() - 1] = torch.tensor(response)
    return PaddedBatch(input_ids.to(device), attention_mask.to(device), targets.to(device))


# ---------------------------------------------------------------------------------------------
# Steps


def _padded_attention() -> str:
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def attention_for(method: str, device: torch.device) -> str:
    if method in (PACKED, PACKED_PREFIX):
        return "flex_attention" if device.type == "cuda" else "sdpa"
    return _padded_attention() if device.type == "cuda" else "sdpa"


@dataclass
class Contestant:
    """A method and the model its step fills with gradients: the shared model, or for the trainer
    methods a copy owned by their trainer (TRL patches the forward of the model it is given)."""

    method: str
    model: torch.nn.Module
    trainer: Any = None


def contestants(methods: Sequence[str], model, device: torch.device,
                workdir: str) -> Tuple[Dict[str, Contestant], Dict[str, str]]:
    """(a Contestant per method, the error status of each method that could not be set up);
    trainers (and their model copies) are built once per run."""
    built, failed = {}, {}
    for method in methods:
        try:
            built[method] = (Contestant(method, *_trainer_and_model(method, model, device, workdir))
                             if method in TRAINER_METHODS else Contestant(method, model))
        except Exception as exc:  # noqa: BLE001 - one broken method is its own rows' result
            failed[method] = error_status(exc)
    return built, failed


def _trainer_and_model(method: str, model, device: torch.device, workdir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ..integrations.trl import FastprefDPOTrainer
    from ..train.default_assets import default_tokenizer

    # transformers 5 renamed gradient_checkpointing (which TRL turns on by default) to activation_checkpointing
    fields = {field.name for field in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = DPOConfig(output_dir=workdir, beta=BETA, max_length=None, precompute_ref_log_probs=True,
                     bf16=False, use_cpu=device.type == "cpu", report_to=[], disable_tqdm=True,
                     **{checkpointing: False})
    # The trainer wants a dataset to start; the benchmark's batches come through its collator instead.
    placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    copy_ = copy.deepcopy(model)
    trainer_class = DPOTrainer if method == TRL_TRAINER else FastprefDPOTrainer
    trainer = trainer_class(model=copy_, args=args, train_dataset=placeholder, processing_class=default_tokenizer())
    return copy_, trainer


def step_function(contestant: Contestant, pairs: Sequence[Pair], device: torch.device) -> Callable[[], torch.Tensor]:
    """A closure for one step of the contestant's method on `pairs` (its inputs built once,
    outside the step): forward, DPO loss against a zero reference, backward; it returns the
    detached loss."""
    method, model = contestant.method, contestant.model
    attention = attention_for(method, device)
    zero_reference = torch.zeros(2 * len(pairs), device=device)
    weight = causal_lm_parts(model).head_weight
    if method in TRAINER_METHODS:
        trainer = contestant.trainer
        collated = trainer.data_collator([dict(prompt_ids=p.prompt_ids, chosen_ids=p.chosen_ids,
                                               rejected_ids=p.rejected_ids) for p in pairs])
        collated["ref_chosen_logps"], collated["ref_rejected_logps"] = zero_reference.cpu().chunk(2)
        batch = trainer._prepare_inputs(collated)

        def trainer_step() -> torch.Tensor:
            model.set_attn_implementation(attention)
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            return loss.detach()

        return trainer_step
    if method in (PACKED, PACKED_PREFIX):
        packed = pack_pairs(pairs, prefix_sharing=method == PACKED_PREFIX).to(device)
        loss_fn = fastpref.PreferenceLoss("sigmoid", beta=BETA)

        def packed_step() -> torch.Tensor:
            model.set_attn_implementation(attention)
            hidden = packed_hidden(model, packed, attention)
            loss = loss_fn(hidden, weight, packed.targets, packed.layout, zero_reference)[0]
            loss.backward()
            return loss.detach()

        return packed_step
    batch = pad_pairs(pairs, device)
    lengths = (batch.targets != IGNORE_INDEX).sum(-1)
    if method == TRL_PADDED:
        def trl_step() -> torch.Tensor:
            model.set_attn_implementation(attention)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            logp = logprobs_from_logits(logits, batch.targets)
            loss = trl_pair_loss(logp.sum(-1), lengths, zero_reference, "sigmoid")
            loss.backward()
            return loss.detach()

        return trl_step
    liger = liger_loss("sigmoid", device)

    def liger_step() -> torch.Tensor:
        model.set_attn_implementation(attention)
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state
        loss = liger(hidden, weight, batch.targets, zero_reference)
        loss.backward()
        return loss.detach()

    return liger_step


def unavailable_reason(method: str) -> Optional[str]:
    if method == LIGER and importlib.util.find_spec("liger_kernel") is None:
        return "n/a (liger-kernel not installed)"
    if method in TRAINER_METHODS and importlib.util.find_spec("trl") is None:
        return "n/a (trl not installed)"
    return None


# ---------------------------------------------------------------------------------------------
# Running


def group_work(cfg: Config, seq_len: int, count: int) -> float:
    """The measurements of one sequence length and pairs per step, in the units of planned_work
    (a step's tokens): every method's runs of a step of `count` pairs."""
    return len(cfg.methods) * runs_per_method(cfg.warmup, cfg.repeat) * count * seq_len


def search_work(cfg: Config, seq_len: int) -> float:
    """One method's max-pairs search, in the units of planned_work: its steps doubling from one
    pair to the limit (where it stops, and how much it bisects, it learns on the way)."""
    counts = [1 << power for power in range(cfg.max_pairs_limit.bit_length())]
    if counts[-1] != cfg.max_pairs_limit:
        counts.append(cfg.max_pairs_limit)
    return sum(counts) * seq_len


def planned_work(cfg: Config) -> float:
    """What run will advance its Progress by in all."""
    return sum(sum(group_work(cfg, seq_len, count) for count in cfg.pairs)
               + (len(cfg.methods) * search_work(cfg, seq_len) if cfg.find_max_pairs else 0.0)
               for seq_len in cfg.seq_lens)


def run(cfg: Config, rows: List[Row], progress: Progress = Progress()) -> None:
    """Append rows per sequence length and pairs per step; then, per sequence length, the largest
    pairs per step each method fits."""
    progress.describe(f"building {cfg.model}")
    model = build_model(cfg.model, cfg.dtype, cfg.device, cfg.seed)
    vocab = model.config.vocab_size
    usable = [method for method in cfg.methods if unavailable_reason(method) is None]
    with tempfile.TemporaryDirectory(prefix="fastpref-bench-") as workdir:
        by_method, broken = contestants(usable, model, cfg.device, workdir)
        models = list({id(c.model): c.model for c in by_method.values()}.values())

        def reset() -> None:
            for each in models:
                each.zero_grad(set_to_none=True)

        for seq_len in cfg.seq_lens:
            seq_rows = []
            for count in cfg.pairs:
                pairs = make_pairs(count, seq_len, vocab, cfg.seed)
                tokens = sum(p.tokens for p in pairs)
                group = [Row(cfg.model, method, seq_len, count, tokens, dtype_name(cfg.dtype))
                         for method in cfg.methods]

                def build(row: Row):
                    if row.method not in by_method:
                        return broken.get(row.method) or unavailable_reason(row.method)
                    return _candidate(row, group, by_method[row.method], pairs, cfg, reset)

                measured, candidates = build_candidates(group, build)
                measure_rows(measured, candidates, cfg.device, cfg.warmup, cfg.repeat,
                             progress.within(f"seq {seq_len}, {count} pairs"), group_work(cfg, seq_len, count))
                for row in measured:
                    if row.status == "ok":
                        row.tokens_per_s = row.tokens / (row.time_ms * 1e-3)
                seq_rows.extend(group)
            if cfg.find_max_pairs:
                for method in cfg.methods:
                    if method not in by_method:
                        progress.advance(search_work(cfg, seq_len))
                        continue
                    try:
                        found = max_pairs(by_method[method], seq_len, cfg, reset,
                                          progress.within(f"seq {seq_len}, {method}: max pairs"))
                    except Exception as exc:  # noqa: BLE001 - the search fails for this method alone
                        found = error_status(exc)
                    for row in seq_rows:
                        if row.method == method:
                            row.max_pairs = found
            rows.extend(seq_rows)


def _candidate(row: Row, group: List[Row], contestant: Contestant, pairs, cfg: Config, reset) -> Candidate:
    step = step_function(contestant, pairs, cfg.device)

    def check(loss: torch.Tensor) -> bool:
        row.loss = float(loss)
        grads = [p.grad.float().norm() for p in contestant.model.parameters() if p.grad is not None]
        row.grad_norm = float(torch.stack(grads).norm())
        baseline = group[0]
        if row.method == TRL_PADDED or baseline.method != TRL_PADDED or baseline.grad_norm is None:
            return math.isfinite(row.loss) and math.isfinite(row.grad_norm)
        row.loss_err = abs(row.loss - baseline.loss) / max(1e-6, abs(baseline.loss))
        row.grad_err = abs(row.grad_norm - baseline.grad_norm) / max(1e-12, baseline.grad_norm)
        return max(row.loss_err, row.grad_err) <= TOLERANCE[cfg.dtype]

    return Candidate(row.method, step, check, reset)


def fits(contestant: Contestant, count: int, seq_len: int, cfg: Config, reset) -> bool:
    """One step with `count` pairs: True when it ran within the memory budget (or, without one,
    without running out of device memory). The pairs are the first `count` of the same random
    stream the measured rows use, so a measured row's pairs fit exactly when that row does."""
    meter = PeakMemory(cfg.device)
    pairs = make_pairs(count, seq_len, contestant.model.config.vocab_size, cfg.seed)
    try:
        step = step_function(contestant, pairs, cfg.device)
        meter.start()
        step()
        peak = meter.stop()
        ok = True
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer; the rest re-raise
        if not is_out_of_memory(exc):
            raise
        ok, peak = False, None
    step = None
    reset()
    release_memory(cfg.device)
    if ok and cfg.memory_budget_mib is not None:
        ok = peak is not None and peak <= cfg.memory_budget_mib
    return ok


def max_pairs(contestant: Contestant, seq_len: int, cfg: Config, reset, progress: Progress = Progress()) -> str:
    """The largest pairs per step that fits: doubling from 1 until a step does not fit, then
    bisecting; ">= limit" when cfg.max_pairs_limit fits and "0" when one pair does not. It
    advances `progress` by search_work, however many steps it takes."""
    left = search_work(cfg, seq_len)

    def tried(count: int) -> bool:
        nonlocal left
        progress.describe(f"trying {count}")
        try:
            return fits(contestant, count, seq_len, cfg, reset)
        finally:
            done = min(left, count * seq_len)
            left -= done
            progress.advance(done)

    try:
        low, high = 0, 1  # low fits (0 trivially); high is the next count to try
        while high <= cfg.max_pairs_limit:
            if not tried(high):
                break
            low, high = high, 2 * high
        else:
            if low < cfg.max_pairs_limit and tried(cfg.max_pairs_limit):
                low = cfg.max_pairs_limit
            if low == cfg.max_pairs_limit:
                return f">= {low}"
            high = cfg.max_pairs_limit
        while high - low > 1:
            middle = (low + high) // 2
            if tried(middle):
                low = middle
            else:
                high = middle
        return str(low)
    finally:
        progress.advance(left)


# ---------------------------------------------------------------------------------------------
# Report


def format_table(rows: Sequence[Row]) -> str:
    baseline = {(r.seq_len, r.pairs): r for r in rows if r.method == TRL_PADDED and r.status == "ok"}
    columns = ["model", "seq len", "pairs/step", "method", "step (ms)", "tokens/s", "speed vs trl-padded",
               "peak mem (MiB)", "mem vs trl-padded", "loss", "loss rel diff", "grad norm rel diff"]
    cells = []
    for r in rows:
        base = baseline.get((r.seq_len, r.pairs))
        if r.status != "ok":
            measured = [r.status] + ["-"] * 4
        else:
            speed = "-" if base is None else f"{base.time_ms / r.time_ms:.2f}x"
            memory = "-" if base is None or not base.peak_mib or r.peak_mib is None else \
                f"{100 * r.peak_mib / base.peak_mib:.1f}%"
            measured = [number(r.time_ms), f"{r.tokens_per_s:,.0f}", speed, number(r.peak_mib), memory]
        cells.append([r.model, str(r.seq_len), str(r.pairs), r.method, *measured,
                      "-" if r.loss is None else f"{r.loss:.4f}",
                      *("-" if e is None else f"{e:.1e}" for e in (r.loss_err, r.grad_err))])
    table = markdown_table(columns, cells)
    searched = {(r.seq_len, r.method): r.max_pairs for r in rows if r.max_pairs is not None}
    if searched:
        table += "\n\nLargest pairs per step that fits:\n\n" + markdown_table(
            ["seq len", "method", "max pairs/step"], [[str(s), m, n] for (s, m), n in searched.items()])
    return table


def _model_notes(cfg: Config) -> List[str]:
    """What the model is, and the fixed memory of training it, which no step's peak includes."""
    if cfg.model in NAMED_MODELS:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(cfg.model, default_cache_dir()))
        what = (f"model: {cfg.model} = the real pretrained {config.architectures[0]} (packaged GGUF, dequantised), "
                f"{dtype_name(cfg.dtype)}, vocab {config.vocab_size}, hidden {config.hidden_size}, "
                f"{config.num_hidden_layers} layers")
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(**MODEL_PRESETS[cfg.model])
        what = (f"model: {cfg.model} = Llama, random weights, {dtype_name(cfg.dtype)}, "
                + ", ".join(f"{key} {value}" for key, value in MODEL_PRESETS[cfg.model].items()))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    size = count * torch.finfo(cfg.dtype).bits / 8 / 2**20
    fixed = (f"fixed part, outside every step's peak: {count / 1e6:.1f}M parameters = {size:.0f} MiB of weights, "
             f"+ {2 * size:.0f} MiB of AdamW state in the same dtype (the {size:.0f} MiB of gradients are in the peak)")
    return [what, fixed]


def format_report(rows: Sequence[Row], cfg: Config, command: str, machine: Optional[MachineLoad] = None) -> str:
    if cfg.memory_budget_mib is not None:
        fit = f"peak memory at most {cfg.memory_budget_mib:g} MiB"
    else:
        fit = "no out-of-memory error"
    notes = [
        *_model_notes(cfg),
        f"step: forward, DPO sigmoid loss (beta = {BETA}) against precomputed zero reference log-probs, backward"
        " into every parameter (no optimizer); pairs: prompt seq_len/4 to seq_len/2 tokens, chosen and rejected"
        " of one length per pair, up to the rest of seq_len",
        "methods: " + "; ".join(f"{m} with {attention_for(m, cfg.device)} attention" for m in cfg.methods),
        "tokens/s: real tokens of both sequences of every pair (2 x prompt + chosen + rejected) per second,"
        " the same count for every method",
        f"{timing_note(cfg.warmup, cfg.repeat)}; peak memory: {memory_method(cfg.device)} (parameters excluded,"
        " their gradients included)",
        f"max pairs/step: largest that fits ({fit}), searched up to {cfg.max_pairs_limit} by doubling then"
        " bisection" if cfg.find_max_pairs else "max pairs/step: not searched",
        "loss rel diff, grad norm rel diff: against trl-padded's loss and the norm of all its parameter"
        f" gradients on the same pairs; a method beyond {TOLERANCE[cfg.dtype]:g} is WRONG and not timed",
    ]
    return "\n".join([*header(TITLE, cfg.device, command, machine, notes), format_table(rows), ""])


def failures(rows: Sequence[Row]) -> List[str]:
    return [f"{r.method} (seq {r.seq_len}, {r.pairs} pairs): {r.status}" for r in rows if is_failure(r.status)]


def plot(rows: Sequence[Row], cfg: Config, path) -> None:
    """Tokens/s and peak memory of each method, a row of panels per sequence length: against
    pairs per step when several were measured, else a bar per method."""
    from .plots import method_figure

    chosen = [r for r in rows if not r.status.startswith("n/a")]
    method_figure(chosen, path, panel_rows=[f"seq {s}" for s in cfg.seq_lens],
                  panel_of=lambda r: f"seq {r.seq_len}", x_of=lambda r: r.pairs, x_label="pairs per step",
                  metrics=(("tokens_per_s", "tokens/s"), ("peak_mib", "peak memory (MiB)")),
                  column_of=lambda r: cfg.model,
                  title=f"one DPO step, {cfg.model}, {dtype_name(cfg.dtype)}, {cfg.device.type}")
