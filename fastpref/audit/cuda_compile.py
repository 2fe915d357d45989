"""Compile every csrc/*.cu for a GPU architecture with nvcc and read ptxas's report per kernel.

``nvcc -cubin -arch=sm_XX -Xptxas -v`` compiles the device code only (templates are
instantiated by the host launchers it still parses) and prints, for each entry function, its
registers, spill bytes and static shared memory. The cubin's SASS (``cuobjdump -sass``) shows
which tensor-core instructions each kernel uses (HGMMA is Hopper's warpgroup MMA, HMMA the
per-warp mma.sync) and its atomics (ATOM/RED).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..progress import progress_bar
from .arches import Arch
from .report import AuditRow

# The device-code flags of setup.py's NVCC_FLAGS (a test keeps the two in step).
NVCC_DEVICE_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")
# A kernel template's element type (its first argument; flags may follow), as the audit names dtypes.
TEMPLATE_DTYPES = {"__nv_bfloat16": "bfloat16", "__half": "float16", "float": "float32"}


def csrc_dir() -> Optional[Path]:
    """The csrc/ folder beside the package (a source checkout or an editable install)."""
    candidate = Path(__file__).resolve().parents[2] / "csrc"
    return candidate if candidate.is_dir() else None


def find_nvcc() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the CUDA toolkit, or the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else None


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas leaves out "bytes smem" for a kernel without shared memory.
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_verbose(log: str) -> Dict[str, Dict[str, int]]:
    """{mangled entry: {"registers", "spill_bytes", "shared_bytes"}} from ``-Xptxas -v`` output."""
    kernels: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = kernels.setdefault(entry.group(1), {})
            continue
        if current is None:
            continue
        spills = _SPILLS.search(line)
        if spills:
            current["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
        usage = _USAGE.search(line)
        if usage:
            current["registers"] = int(usage.group(1))
            current["shared_bytes"] = int(usage.group(2) or 0)
    return kernels


def sass_by_function(sass: str) -> Dict[str, str]:
    """{mangled function: its SASS} from ``cuobjdump -sass``."""
    functions: Dict[str, List[str]] = {}
    current = None
    for line in sass.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def sass_tensor_cores(sass: str) -> str:
    if re.search(r"\bHGMMA\b", sass):
        return "wgmma"
    if re.search(r"\bHMMA\b", sass):
        return "mma.sync"
    return "-"


def demangle(names: List[str]) -> Dict[str, str]:
    """{mangled: readable} through c++filt where it exists (else the names stay as they are)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    readable = result.stdout.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {name: name for name in names}


def split_kernel_name(readable: str):
    """("slab_logit_gradient_kernel", "__nv_bfloat16") from a demangled signature."""
    head = readable.replace("(anonymous namespace)::", "").split("(", 1)[0]
    template = ""
    if head.endswith(">"):
        head, _, template = head.partition("<")
        template = template[:-1]
    return head.rsplit("::", 1)[-1], template


def compile_source(nvcc: str, source: Path, arch: Arch, cuobjdump: Optional[str]) -> List[AuditRow]:
    """One row per kernel of `source` compiled for `arch` (one error row if it fails)."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "out.cubin")
        command = [nvcc, "-cubin", f"-arch={arch.name}", *NVCC_DEVICE_FLAGS, "-Xptxas", "-v",
                   "-I", str(source.parent), str(source), "-o", cubin]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - began
        if result.returncode != 0:
            message = " | ".join(line for line in (result.stderr or result.stdout).splitlines()[:6])
            return [AuditRow("cuda", f"{source.name}:(file)", "", arch.name, None, None, None, None, "-", None,
                             elapsed, error=f"nvcc failed: {message}")]
        sass = ""
        if cuobjdump:
            dumped = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=False)
            sass = dumped.stdout if dumped.returncode == 0 else ""
    kernels = parse_ptxas_verbose(result.stderr + result.stdout)
    functions = sass_by_function(sass)
    readable = demangle(list(kernels))
    rows = []
    for mangled, figures in kernels.items():
        name, template = split_kernel_name(readable[mangled])
        code = functions.get(mangled)
        rows.append(AuditRow(
            language="cuda", kernel=f"{source.name}:{name}", config=template, arch=arch.name,
            dtype=TEMPLATE_DTYPES.get(template.split(",")[0].strip()),
            registers=figures.get("registers"), spill_bytes=figures.get("spill_bytes"),
            shared_bytes=figures.get("shared_bytes"),
            tensor_cores=sass_tensor_cores(code) if code is not None else "n/a",
            atomics=len(re.findall(r"\b(?:ATOM|ATOMG|RED|REDG)\.", code)) if code is not None else None,
            compile_s=elapsed))
    return rows


def audit_csrc(arches: List[Arch], progress: bool = False) -> List[AuditRow]:
    """Every kernel of every csrc/*.cu on every arch; empty when there is no csrc/ or no nvcc.
    With `progress`, a bar over the compiles on a terminal's stderr."""
    folder, nvcc = csrc_dir(), find_nvcc()
    if folder is None or nvcc is None:
        return []
    cuobjdump = find_cuobjdump()
    compiles = [(source, arch) for source in sorted(folder.glob("*.cu")) for arch in arches]
    rows = []
    with progress_bar("nvcc", len(compiles), enabled=progress, counting="compiles") as bar:
        for source, arch in compiles:
            bar.set_description_str(f"nvcc: {source.name} for {arch.name}", refresh=True)
            rows += compile_source(nvcc, source, arch, cuobjdump)
            bar.update()
    return rows
