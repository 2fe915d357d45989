"""The memory plan's estimates (``fastpref plan --memory``) against the peak memory ``fastpref
train`` measurably takes on the CPU, setting by setting.

Each setting runs in a process of its own: ``fastpref train`` for 3 steps on the bundled sample's
longest pairs, float32 and sdpa, as on a CPU. A step's memory is its peak resident set (VmHWM,
reset after every step; steps 2 and 3, once AdamW's state exists) less what the process held
beyond the model's tensors once the model was loaded (the interpreter, the libraries, the
tokenizer and the data: no GPU holds them). glibc's mmap threshold is fixed at 128 KiB
(MALLOC_MMAP_THRESHOLD_), so that every tensor larger than that is a mapping of its own, returned
when freed: the resident set then follows the live tensors rather than the allocator's retained
heap. The estimate is the plan's, from the model's config and the step's micro-batch lengths
alone (the same setting on the CPU: float32, sdpa's dense mask, AdamW one tensor at a time).

    python benchmarks/bench_memory_plan.py --models smollm2-135m gemma3-270m \\
        --output benchmarks/results/cpu-memory-plan
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {  # name: (adaptation, gradient checkpointing, pairs per micro-batch)
    "full, 2 pairs": ("full", False, 2),
    "full, 4 pairs, checkpointing": ("full", True, 4),
    "LoRA r 16, 4 pairs": ("lora", False, 4),
    "LoRA r 16, 8 pairs, checkpointing": ("lora", True, 8),
    "QLoRA 4-bit r 16, 4 pairs": ("qlora-4bit", False, 4),
}
TRAIN_OPTIONS = dict(max_length=256, max_prompt_length=128)
MIB = 1 << 20


@dataclasses.dataclass
class Measurement:
    model: str
    setting: str
    steps: list  # per measured step: its micro-batch's tokens, measured and estimated peak (bytes), the terms
    overhead: int  # bytes the process held beyond the model's tensors once it was loaded
    report: list  # the trainer's memory report
    seconds: float

    @property
    def worst(self) -> dict:
        """The measured step the estimate is furthest from."""
        return max(self.steps, key=lambda step: abs(step["estimate"] / step["measured"] - 1))


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(options: dict) -> dict:
    """Train one setting; per measured step, its peak and the plan's estimate for its micro-batch."""
    libc = ctypes.CDLL("libc.so.6")
    from transformers import AutoConfig

    from fastpref.train.loop import TrainConfig, Trainer
    from fastpref.train.memory import (MemorySetting, ModelShape, estimate_memory, packed_tokens, scored_tokens,
                                       stored_bytes)

    adaptation, checkpointing, pairs = options["setting"]
    peaks = {}

    def on_step(step: int) -> None:
        if step > 1:  # step 1 creates AdamW's state: steps 2 and 3 are the steady ones
            peaks[step] = _status("VmHWM")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak resident set starts again from the current one

    lora_r = 0 if adaptation == "full" else 16
    cfg = TrainConfig(model=options["model"], data=options["data"], output_dir=options["output_dir"],
                      cache_dir=options["cache_dir"], max_steps=3, pairs_per_step=pairs, lora_r=lora_r,
                      load_in_4bit=adaptation == "qlora-4bit", gradient_checkpointing=checkpointing,
                      eval_fraction=0.0, score_train_pairs=0, save_steps=1000, progress=False, seed=0,
                      **TRAIN_OPTIONS).resolved()
    trainer = Trainer(cfg, on_step=on_step)
    # what the process holds beyond the model's tensors (interpreter, libraries, tokenizer, data)
    # is no GPU's memory: it is measured once the model is loaded and set aside
    libc.malloc_trim(0)
    overhead = _status("VmRSS") - stored_bytes(trainer.policy.parameters())
    trainer.run()
    shape = ModelShape.from_config(AutoConfig.from_pretrained(trainer.cfg.model, local_files_only=True))
    setting = MemorySetting(adaptation=adaptation, gradient_checkpointing=checkpointing, lora_r=lora_r or 16,
                            compute_bytes=4, device_type="cpu", attention=trainer.attention)
    steps = []
    for step, peak in sorted(peaks.items()):
        (batch,) = trainer._micro_batches(step - 1)
        tokens = sum(packed_tokens(pair, cfg.prefix_sharing) for pair in batch)
        estimate = estimate_memory(shape, setting, tokens=tokens,
                                   scored_tokens=sum(scored_tokens(pair) for pair in batch))
        steps.append({"step": step, "tokens": tokens, "measured": peak - overhead, "estimate": estimate.peak,
                      "terms": dataclasses.asdict(estimate), "moments": estimate.moments})
    return {"steps": steps, "overhead": overhead,
            "report": [line.split("memory: ")[1] for line in trainer.memory_lines]}


def longest_pairs_file(directory: Path, count: int) -> str:
    """The bundled sample's `count` longest rows (by characters), as a JSONL file."""
    from fastpref.train import data as data_module

    rows = data_module.load_rows(None).to_list()
    rows.sort(key=lambda row: -sum(len(str(value)) for value in row.values()))
    path = directory / "longest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], help="model folders or packaged names")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", help="write <output>.md and <output>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    from fastpref.bench.report import MachineWatch, header, markdown_table, write_outputs

    watch = MachineWatch()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = longest_pairs_file(Path(scratch), 48)
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        for model in args.models:
            for name in args.settings:
                options = {"model": model, "data": data, "setting": SETTINGS[name],
                           "output_dir": str(Path(scratch) / "run"), "cache_dir": str(Path(scratch) / "cache")}
                started = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(options)], env=environment,
                                      capture_output=True, text=True)
                result = next((json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                               if line.startswith("RESULT ")), None)
                if result is None:
                    raise SystemExit(f"{model}, {name} failed:\n{done.stderr[-3000:]}")
                row = Measurement(model=model, setting=name, seconds=time.perf_counter() - started, **result)
                rows.append(row)
                for step in row.steps:
                    print(f"{model}, {name}, step {step['step']} ({step['tokens']} tokens): estimate "
                          f"{step['estimate'] / MIB:,.0f} MiB, measured {step['measured'] / MIB:,.0f} MiB "
                          f"({step['estimate'] / step['measured']:.2f}x)", flush=True)
    machine = watch.finish()
    command = "python benchmarks/bench_memory_plan.py " + " ".join(sys.argv[1:])
    lines = header("The memory plan's estimates against measured peak memory (CPU, float32)", torch.device("cpu"),
                   command, machine, [
                       "measured: the peak resident set of each of training steps 2 and 3, less what the process "
                       "held beyond the model's tensors once the model was loaded; glibc's mmap threshold fixed at "
                       "128 KiB (see the script's docstring)",
                       "estimate: `fastpref plan --memory`'s (fastpref.train.memory.estimate_memory), from the "
                       "model's config and the step's micro-batch lengths, for the same setting on the CPU "
                       "(float32, sdpa, AdamW one tensor at a time)",
                       f"data: the bundled sample's 48 longest pairs, cut to {TRAIN_OPTIONS['max_length']} tokens "
                       f"(prompt {TRAIN_OPTIONS['max_prompt_length']})"])
    table = markdown_table(
        ["model", "setting", "step", "micro-batch tokens", "estimate (MiB)", "measured (MiB)", "estimate / measured",
         "largest moment (estimate)"],
        [[row.model, row.setting, str(step["step"]), f"{step['tokens']:,}", f"{step['estimate'] / MIB:,.0f}",
          f"{step['measured'] / MIB:,.0f}", f"{step['estimate'] / step['measured']:.2f}",
          max(step["moments"], key=step["moments"].get)] for row in rows for step in row.steps])
    worst = max(abs(row.worst["estimate"] / row.worst["measured"] - 1) for row in rows)
    report = "\n".join([*lines, table, "", f"Largest error: {worst:.0%} of the measured peak."])
    print(report)
    for path in write_outputs(args.output, report, rows, machine):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
