"""The preference loss's share of a step: every loss type of fastpref.loss_types against the LM head.

The head (fastpref.linear_logprobs, forward and backward, a trainable head) is where the FLOPs
are; the loss on top (per-sequence sums, the loss type's formula, autograd's backward through it)
is O(pairs) torch. For each loss type: the loss's forward + backward time, the head's, the
share, and the torch ops the loss dispatches (forward + backward), each a kernel launch on a GPU.

    python benchmarks/bench_loss_share.py --tokens 4096 --hidden 256 --vocab 16384 --pairs 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref
from fastpref.bench.report import device_name, markdown_table, utc_now, versions
from fastpref.loss_spec import LossSpec
from fastpref.loss_types import ALL, PAIRED, loss_terms

# loss types with the hyper-parameters that make them valid, and TRL's options on top of sigmoid
SETTINGS = [(name, {"label_smoothing": 0.1} if name == "exo_pair" else {}) for name in ALL] + [
    ("sigmoid", {"use_weighting": True}),
    ("sigmoid", {"ld_alpha": 0.5}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _layout(tokens: int, pairs: int, unpaired: bool):
    length = tokens // (2 * pairs)
    cu_seqlens = torch.arange(0, 2 * pairs + 1) * length
    mask = torch.ones(2 * pairs * length, dtype=torch.bool)
    mask[::length] = False  # a prompt token first in each sequence
    if unpaired:
        return fastpref.PackedLayout.unpaired(cu_seqlens, mask, torch.arange(2 * pairs) % 2 == 0)
    return fastpref.PackedLayout.paired(cu_seqlens, mask, torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2))


def _median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(tokens: int, hidden_size: int, vocab: int, pairs: int, repeats: int):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)

    def head():
        logp = fastpref.linear_logprobs(hidden, weight, targets, backend="torch")
        logp.sum().backward()

    head_ms = _median_ms(head, repeats)
    rows = []
    for name, options in SETTINGS:
        spec = LossSpec.build(name, **options)
        layout = _layout(tokens, pairs, unpaired=not spec.is_paired)
        token_logp = (-torch.rand(tokens, generator=generator) * 5).masked_fill(~layout.response_mask, 0.0)
        token_logp.requires_grad_()
        reference = torch.randn(2 * pairs, generator=generator) - 40 if spec.needs_reference else None
        kl = torch.zeros(()) if not spec.is_paired else None
        log_weights = torch.randn(2 * pairs, generator=generator) if spec.use_weighting else None

        def loss():
            loss_terms(token_logp, layout, reference, spec, kl, sequence_log_weights=log_weights).loss.backward()

        loss_ms = _median_ms(loss, repeats)
        counter = _OpCounter()
        with counter:
            loss()
        label = name + "".join(f", {key}={value}" for key, value in options.items())
        rows.append({"loss": label, "loss ms": loss_ms, "head ms": head_ms, "share": loss_ms / head_ms,
                     "ops": counter.count, "trainer": PAIRED[name].trainer if name in PAIRED else "KTOTrainer"})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    rows = measure(args.tokens, args.hidden, args.vocab, args.pairs, args.repeats)
    table = markdown_table(["loss type", "loss ms", "head ms", "loss / head", "torch ops (launches on a GPU)"],
                           [[r["loss"], f"{r['loss ms']:.2f}", f"{r['head ms']:.0f}", f"{100 * r['share']:.2f}%",
                             str(r["ops"])] for r in rows])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    report = (f"# The loss's share of a step ({device_name(torch.device('cpu'))}, {utc_now()})\n\n"
              f"N = {args.tokens} tokens, H = {args.hidden}, V = {args.vocab}, {args.pairs} pairs, median of "
              f"{args.repeats}; forward + backward of each; {torch.get_num_threads()} torch threads, load average "
              f"{load} at the end (other work shares the cores: the shares hold, the times stretch). "
              f"{versions()}\n\n"
              f"    python benchmarks/bench_loss_share.py --tokens {args.tokens} --hidden {args.hidden} "
              f"--vocab {args.vocab} --pairs {args.pairs} --repeats {args.repeats}\n\n{table}\n")
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return rows


if __name__ == "__main__":
    main()
