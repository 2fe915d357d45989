"""``fastpref kernels``: compile every kernel for sm_90 and sm_80 on this machine and print the table."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List

from .arches import ARCHES

FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHES), default=list(ARCHES),
                        help="architectures to compile for (default: all of them)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes for the Triton kernels (default: one per core)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    parser.add_argument("--full", action="store_true",
                        help="print every binary's row, not only the per-kernel summary and the failures")
    parser.add_argument("--out", metavar="STEM",
                        help="write STEM.md (summary and every row) and STEM.json (the machine and the raw rows)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they go to stderr, and only where it is a terminal)")


def run(args: argparse.Namespace, command: str, argv: List[str]) -> int:
    """0 when every binary passes (compiles, no spills, shared memory within the limit, wgmma on
    sm_90 for bf16/fp16) and every kernel is covered; 1 otherwise."""
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter replaces Triton's compiler in this process: audit in a fresh one.
        environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fastpref.cli", "kernels", *argv], env=environment).returncode

    from ..bench.report import MachineWatch, utc_now, write_outputs
    from .report import audit, format_summary, format_table

    watch = MachineWatch()
    result = audit(args.arch, triton=not args.no_triton, cuda=not args.no_cuda, workers=args.jobs,
                   progress=not args.no_progress)
    machine = watch.finish()

    failures = result.failures
    lines = ["# Kernels compiled offline for " + ", ".join(f"{name} ({ARCHES[name].gpu})" for name in args.arch),
             "", f"- {_tool_versions()}", f"- command: `{command}`", f"- date: {utc_now()}",
             f"- {machine.describe()} (compile times depend on it)",
             f"- {len(result.rows)} binaries, {len(failures)} failing"
             + (f"; kernels no configuration launches: {', '.join(result.uncovered)}" if result.uncovered else ""),
             *(f"- not audited: {reason}" for reason in result.missing_tools),
             "- a binary fails on a compile error, any spill, shared memory over the arch's limit, or a bf16/fp16 "
             "Triton matmul on sm_90 that does not lower to wgmma", "",
             "## Per kernel", "", format_summary(result.rows), ""]
    if failures:
        lines += ["## Failing", "", format_table([row for row, _ in failures]), ""]
    full = ["## Every binary", "", format_table(result.rows), ""]
    report = "\n".join(lines + (full if args.full else []))
    print(report)
    written = write_outputs(args.out, "\n".join(lines + full), result.rows, machine)
    if written:
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    for row, problems in failures:
        print(f"FAIL {row.language}:{row.kernel} [{row.config}] {row.arch}: {'; '.join(problems)}", file=sys.stderr)
    for kernel in result.uncovered:
        print(f"FAIL {kernel}: no configuration of the audit launches it; add its launcher's configurations "
              "to fastpref/audit/launches.py", file=sys.stderr)
    return FAILED if (failures or result.uncovered) else 0


def _tool_versions() -> str:
    import importlib.metadata

    from .cuda_compile import find_nvcc

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    nvcc = find_nvcc()
    nvcc_version = "not found"
    if nvcc:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
        nvcc_version = next((line.strip() for line in output.splitlines() if "release" in line), "unknown")
    return f"triton {triton_version} (its own ptxas), nvcc: {nvcc_version}"
