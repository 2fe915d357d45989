"""Flags the benchmark ops share, and their checks."""
from __future__ import annotations

import argparse
from typing import List, Sequence

import torch

from .. import backends as _backends
from .reference import DTYPES

HEADS = ("trainable", "frozen")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, backends: bool = True) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the model, hidden states and head")
    if backends:
        parser.add_argument("--backends", nargs="+", choices=_backends.registered_backends(),
                            help="fastpref backends to measure (default: all that run on the device)")
        parser.add_argument("--head", choices=("trainable", "frozen", "both"), default="both",
                            help="LM head requires grad (trainable), not (frozen), or measure both (default)")
    parser.add_argument("--warmup", type=positive_int,
                        help="untimed runs per method; the first is checked against a reference")
    parser.add_argument("--repeat", type=positive_int, help="timed runs per method (median reported)")
    parser.add_argument("--out", metavar="STEM",
                        help="also write STEM.md (the report), STEM.json (the machine and the raw rows) and"
                             " STEM.png (time and peak memory per method: against the size when several are"
                             " measured, a bar each at one size)")
    parser.add_argument("--no-plot", action="store_true", help="with --out, skip the plot")


def device_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def backends_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                       device: torch.device) -> List[str]:
    names = args.backends if args.backends is not None else _backends.available_backends(device)
    for name in names:
        try:
            _backends.resolve(name, device)
        except RuntimeError as exc:
            parser.error(f"--backends: {exc}")
    return list(dict.fromkeys(names))


def heads_from_args(args: argparse.Namespace) -> Sequence[str]:
    return HEADS if args.head == "both" else (args.head,)
