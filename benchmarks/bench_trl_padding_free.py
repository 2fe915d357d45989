"""FastprefDPOTrainer with padding_free=True against its padded step, on the bundled HH-RLHF sample.

Both trainers take the same pairs in the same batches (TRL's tokenization and truncation; the
reference log-probs precomputed, so a step is the policy's forward, loss and backward). For each
batch: the loss of both (they must agree), the step time, and the peak memory the step adds (CPU:
the resident-set peak over the step, see fastpref.bench.measure.PeakMemory). tokens/s counts the
real tokens only (the padded step computes its padding too).

    python benchmarks/bench_trl_padding_free.py --pairs-per-step 4 --max-length 512 --steps 8
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from trl import DPOConfig

from fastpref.bench.measure import PeakMemory
from fastpref.integrations.trl import FastprefDPOTrainer
from fastpref.train.data import load_rows
from fastpref.train.default_assets import default_model, default_tokenizer


def _trainer(model, tokenizer, rows, workdir, padding_free, args):
    config = DPOConfig(output_dir=workdir, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                       per_device_train_batch_size=args.pairs_per_step, max_length=args.max_length,
                       precompute_ref_log_probs=True, gradient_checkpointing=False, padding_free=padding_free)
    trainer = FastprefDPOTrainer(model=copy.deepcopy(model), args=config, train_dataset=rows,
                                 processing_class=tokenizer)
    trainer.model.set_attn_implementation(args.attention)
    trainer.model.train()
    return trainer


def _batches(trainer, args):
    size = args.pairs_per_step
    for step in range(args.steps + 1):  # the first one warms up
        examples = [trainer.train_dataset[i] for i in range(step * size, (step + 1) * size)]
        yield trainer._prepare_inputs(trainer.data_collator(examples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--attention", default="sdpa", help="the model's attention implementation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = default_tokenizer()
    model = default_model(tokenizer)
    rows = Dataset.from_list(list(load_rows().select(range(args.pairs_per_step * (args.steps + 1)))))
    memory = PeakMemory(torch.device("cpu"))
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for padding_free in (False, True):
            trainer = _trainer(model, tokenizer, rows, workdir, padding_free, args)
            losses, seconds, peaks, tokens, computed = [], [], [], 0, 0
            for step, batch in enumerate(_batches(trainer, args)):
                trainer.model.zero_grad(set_to_none=True)
                memory.start()
                start = time.perf_counter()
                loss = trainer.compute_loss(trainer.model, batch)
                loss.backward()
                elapsed = time.perf_counter() - start
                peak = memory.stop()
                if step == 0:
                    continue
                losses.append(loss.item())
                seconds.append(elapsed)
                peaks.append(peak)
                if padding_free:
                    tokens += batch["packed"].input_ids.shape[1]
                    computed += batch["packed"].input_ids.shape[1]
                else:
                    tokens += int(batch["attention_mask"].sum())
                    computed += batch["input_ids"].numel()
            results[padding_free] = dict(losses=losses, tokens_per_s=tokens / sum(seconds),
                                         peak_mib=statistics.median(peaks), max_peak_mib=max(peaks),
                                         padding=1 - tokens / computed)
    padded, packed = results[False], results[True]
    worst = max(abs(a - b) / abs(a) for a, b in zip(padded["losses"], packed["losses"]))
    print(f"{args.steps} steps of {args.pairs_per_step} pairs, max_length {args.max_length}, attention "
          f"{args.attention}, {args.threads} thread(s); losses agree to {worst:.1e} (relative)")
    print("| step | padding computed | tokens/s | peak MiB (median, max) |")
    print("|---|---|---|---|")
    for name, result in (("padded", padded), ("padding_free", packed)):
        print(f"| {name} | {result['padding']:.0%} | {result['tokens_per_s']:.0f} | "
              f"{result['peak_mib']:.0f}, {result['max_peak_mib']:.0f} |")
    print(f"padding_free: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x tokens/s, "
          f"{packed['peak_mib'] / padded['peak_mib']:.2f}x median peak memory")


if __name__ == "__main__":
    main()
