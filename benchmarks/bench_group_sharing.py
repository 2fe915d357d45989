"""A prompt's K responses in one packed forward, against the same pairs packed one by one.

Every pair among K responses (K(K-1)/2 pairs, what ``--pair-selection margin`` makes of distinct
scores) is trained three ways, forward and backward through a Llama and the DPO loss:

* **pairs**: each pair its own [prompt | chosen], [prompt | rejected] segments: the prompt twice
  per pair, a response once per pair it is in (padding-free packing of pairs, as in TRL);
* **pairs, prefix-shared**: each pair [prompt | chosen | rejected]: the prompt once per pair;
* **group**: [prompt | r_0 | ... | r_{K-1}]: the prompt once, each response once, its log-prob
  used by every pair it is in (``--group-by-prompt --prefix-sharing``).

All three give the same loss and gradients (tests/test_packing.py); the table gives the stream's
tokens, the step's time, and pairs trained per second.

    python benchmarks/bench_group_sharing.py --prompt 48 --response 24 --groups 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastpref
from fastpref.bench.report import header, load_average, markdown_table
from fastpref.causal_lm import causal_lm_parts
from fastpref.train.data import TokenizedGroup, TokenizedPair
from fastpref.train.model import packed_hidden
from fastpref.train.packing import pack_pairs


def model_of(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                                        attn_implementation="sdpa"))


def groups_of(count: int, k: int, prompt: int, response: int, vocab: int):
    generator = torch.Generator().manual_seed(k)

    def tokens(length):
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    pairs = tuple((i, j) for i in range(k) for j in range(i + 1, k))
    return [TokenizedGroup(tokens(prompt), tuple(tokens(response) for _ in range(k)), pairs, row=g,
                           rows=tuple(range(len(pairs)))) for g in range(count)]


def step_ms(model, packed, loss_fn, repeats: int) -> float:
    parts = causal_lm_parts(model)
    reference = -torch.rand(packed.layout.num_sequences, generator=torch.Generator().manual_seed(1)) * 50

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(packed_hidden(model, packed, "sdpa"), parts.head_weight, packed.targets, packed.layout,
                          reference)
        loss.backward()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=48, help="prompt tokens")
    parser.add_argument("--response", type=int, default=24, help="tokens of each response")
    parser.add_argument("--groups", type=int, default=1, help="prompts per batch")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="responses per prompt")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    model = model_of(args.vocab).train()
    loss_fn = fastpref.PreferenceLoss("sigmoid", beta=0.1)
    rows = []
    for k in args.k:
        groups = groups_of(args.groups, k, args.prompt, args.response, args.vocab)
        pairs = [TokenizedPair(g.prompt_ids, g.responses[c], g.responses[r], row=n)
                 for g in groups for n, (c, r) in enumerate(g.pairs)]
        ways = [("pairs", pairs, False), ("pairs, prefix-shared", pairs, True), ("group", groups, True)]
        unshared_ms = None
        for name, items, prefix_sharing in ways:
            packed = pack_pairs(items, prefix_sharing=prefix_sharing)
            ms = step_ms(model, packed, loss_fn, args.repeats)
            unshared_ms = unshared_ms or ms
            rows.append([str(k), str(len(pairs)), name, str(packed.input_ids.shape[1]), f"{ms:.0f}",
                         f"{1000 * len(pairs) / ms:.1f}", f"{unshared_ms / ms:.2f}x"])
            print(rows[-1], flush=True)
    table = markdown_table(["K", "pairs", "packed as", "stream tokens", "step ms", "pairs/s", "speed-up"], rows)
    command = (f"python benchmarks/bench_group_sharing.py --prompt {args.prompt} --response {args.response} "
               f"--groups {args.groups} --k {' '.join(map(str, args.k))} --vocab {args.vocab} --repeats {args.repeats}")
    lines = header("A prompt's K responses in one forward", torch.device("cpu"), command, None, [
        f"Llama, hidden 256, 4 layers, vocab {args.vocab}, float32, sdpa; {args.groups} prompt(s) of {args.prompt} "
        f"tokens, responses of {args.response}, every pair among the K; DPO (sigmoid) loss; forward + backward, "
        f"median of {args.repeats}; {torch.get_num_threads()} torch threads, load average {load_average()} at the end",
        "sdpa on a CPU takes the packed stream's dense [T, T] mask, so its attention costs T^2 however the stream "
        "is cut into segments: the longer streams of the pairs packed one by one pay that twice over. Where "
        "attention costs each segment its own length (FlashAttention's varlen, on a GPU, for the plain packing), "
        "expect a speed-up nearer the ratio of stream tokens."])
    report = "\n".join(lines) + f"\n{table}\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return rows


if __name__ == "__main__":
    main()
