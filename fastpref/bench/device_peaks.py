"""The device's own ceilings, measured in the run that quotes them: dense matmul rate and copy bandwidth.

A datasheet peak is a lead, not a ceiling: fastpref's TFLOP/s are read against the rate this
device reached on a plain square matmul (torch.matmul, i.e. cuBLAS on a GPU) in the same run,
and its byte counts against a device-to-device copy (bytes read + bytes written). Inputs are
random (zeros run faster than real data on some GPUs); each figure is the median of timed runs
after a warm-up.

``python -m fastpref.bench.device_peaks [--device cuda] [--out STEM]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .measure import time_ms
from .reference import DTYPES, dtype_name
from .report import device_name, utc_now, versions


@dataclass
class DevicePeaks:
    device: str
    matmul_dtype: str
    matmul_size: int
    matmul_tflops: float
    copy_mib: int
    copy_tb_per_s: float
    date: str


def _median_ms(step, device: torch.device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        step()
    return statistics.median(time_ms(step, device) for _ in range(repeat))


def measure_peaks(device: torch.device, dtype: torch.dtype, size: int, copy_mib: int, warmup: int = 3,
                  repeat: int = 10) -> DevicePeaks:
    """size x size x size matmul TFLOP/s and a copy of `copy_mib` MiB in TB/s (read + written)."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    matmul_ms = _median_ms(lambda: torch.matmul(a, b), device, warmup, repeat)
    del a, b
    source = torch.randn(copy_mib << 18, device=device, generator=generator)  # float32: 4 bytes each
    target = torch.empty_like(source)
    copy_ms = _median_ms(lambda: target.copy_(source), device, warmup, repeat)
    moved = 2 * source.numel() * source.element_size()
    return DevicePeaks(device_name(device), dtype_name(dtype), size, 2 * size ** 3 / (matmul_ms * 1e-3) / 1e12,
                       copy_mib, moved / (copy_ms * 1e-3) / 1e12, utc_now())


def format_peaks(peaks: DevicePeaks) -> str:
    return (f"| device | matmul | matmul TFLOP/s | copy | copy TB/s (read + write) |\n|---|---|---|---|---|\n"
            f"| {peaks.device} | {peaks.matmul_dtype} {peaks.matmul_size}^3 | {peaks.matmul_tflops:.1f} "
            f"| {peaks.copy_mib} MiB | {peaks.copy_tb_per_s:.2f} |")


def load_peaks(path: Path) -> Optional[DevicePeaks]:
    try:
        return DevicePeaks(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.bench.device_peaks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="matmul dtype (default: bfloat16 on a GPU, "
                                                                 "float32 on a CPU)")
    parser.add_argument("--size", type=int, help="matmul size (default: 8192 on a GPU, 512 on a CPU)")
    parser.add_argument("--copy-mib", type=int, help="copy size in MiB (default: 4096 on a GPU, 64 on a CPU)")
    parser.add_argument("--out", metavar="STEM", help="write STEM.md and STEM.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    for name in ("size", "copy_mib"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    peaks = measure_peaks(device, DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")],
                          args.size or (8192 if on_gpu else 512), args.copy_mib or (4096 if on_gpu else 64))
    report = "\n".join(["# Device ceilings", "", f"- {versions()}", f"- date: {peaks.date}", "",
                        format_peaks(peaks), ""])
    print(report)
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(report)
        stem.with_suffix(".json").write_text(json.dumps(asdict(peaks), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
