"""Builds the CUDA backend's extension module from csrc/ with the host C++ compiler, for the CPU.

The kernel code compiles as it is against cuda_emulation.h, which serves the CUDA headers it
includes. Two constructs of the .cu files that a host compiler cannot parse are rewritten: a
launch ``kernel<<<grid, block, smem, stream>>>(args);`` becomes ``cuda_emulation::launch(kernel,
grid, block, smem, stream, [&] { kernel(args); });`` and an ``extern __shared__`` array a pointer
to the emulated dynamic shared memory. bindings.cpp is compiled as it is. The result is a module
with the interface of fastpref._C that takes CPU pointers.

A build is cached under a hash of everything that goes into it (csrc/, this harness, compiler,
flags), so that only a change to one of those rebuilds it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import List, Optional

HARNESS = Path(__file__).resolve().parent
CSRC = HARNESS.parents[1] / "csrc"
CUDA_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")
CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-Wno-unknown-pragmas"]
SANITIZER_FLAGS = {
    None: [],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"],
    "thread": ["-fsanitize=thread", "-g"],
}
MODULE_FILE = "_C" + sysconfig.get_config_var("EXT_SUFFIX")

LAUNCH = re.compile(r"(?P<kernel>\w+(?:<[\w:, ]+>)?)<<<(?P<config>.*?)>>>\((?P<args>.*?)\);", re.S)
DYNAMIC_SHARED = re.compile(r"extern __shared__ unsigned char (\w+)\[\];")


def compiler() -> Optional[str]:
    return shutil.which("g++")


def python_headers() -> Optional[str]:
    """Python's include folder, if it holds Python.h (a Python without its headers has none)."""
    include = sysconfig.get_paths()["include"]
    return include if os.path.isfile(os.path.join(include, "Python.h")) else None


def pybind11_headers() -> str:
    try:
        import pybind11
    except ImportError:  # torch ships a copy of pybind11's headers
        import torch

        return os.path.join(os.path.dirname(torch.__file__), "include")
    return pybind11.get_include()


def emulated_source(cuda_file: Path) -> str:
    """A .cu file as host C++, with #line so that diagnostics name the original file and lines."""
    launch = r"cuda_emulation::launch(\g<kernel>, \g<config>, [&] { \g<kernel>(\g<args>); });"
    text = LAUNCH.sub(launch, cuda_file.read_text())
    pointer = r"unsigned char* const \1 = cuda_emulation::dynamic_shared_memory;"
    text = DYNAMIC_SHARED.sub(pointer, text)
    if "<<<" in text or "extern __shared__" in text:
        raise RuntimeError(f"{cuda_file}: a launch or an extern __shared__ declaration of a form "
                           "that build.py does not rewrite; extend LAUNCH or DYNAMIC_SHARED")
    return f'#line 1 "{cuda_file}"\n{text}'


def _fingerprint(commands: List[List[str]]) -> str:
    digest = hashlib.sha256()
    sources = sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    for path in [*sources, HARNESS / "cuda_emulation.h", Path(__file__).resolve()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    version = subprocess.run([commands[0][0], "--version"], capture_output=True, text=True).stdout
    digest.update(repr((commands, version)).encode())
    return digest.hexdigest()[:16]


def build(cache_dir: Path, sanitizer: Optional[str] = None) -> Path:
    """The emulated module's file: the cached build if there is one, else a new one.

    cache_dir holds one build at a time, in a folder named by its fingerprint; a new build
    replaces the others. sanitizer: None, "address" or "thread" (-fsanitize=...).
    """
    cxx = compiler()
    flags = [*CXX_FLAGS, *SANITIZER_FLAGS[sanitizer]]
    kernels = sorted(CSRC.glob("*.cu"))
    # Paths inside the build folder are relative (run from there), so that they fingerprint alike.
    compile_kernel = [cxx, *flags, "-Iinclude", f"-I{HARNESS}", f"-I{CSRC}", "-c"]
    compile_bindings = [cxx, *flags, "-fvisibility=hidden", f"-I{python_headers()}",
                        f"-I{pybind11_headers()}", "-c", str(CSRC / "bindings.cpp"),
                        "-o", "bindings.o"]
    objects = [f"{cuda.name}.o" for cuda in kernels] + ["bindings.o"]
    link = [cxx, "-shared", "-pthread", *SANITIZER_FLAGS[sanitizer], *objects, "-o", MODULE_FILE]
    key = _fingerprint([compile_kernel, compile_bindings, link])
    built = Path(cache_dir) / key / MODULE_FILE
    if built.exists():
        return built

    work = Path(tempfile.mkdtemp(dir=cache_dir, prefix="building-"))
    (work / "include").mkdir()
    for header in CUDA_HEADERS:
        (work / "include" / header).write_text('#include "cuda_emulation.h"\n')
    commands = [compile_bindings]
    for cuda in kernels:
        (work / f"{cuda.name}.cpp").write_text(emulated_source(cuda))
        commands.append([*compile_kernel, f"{cuda.name}.cpp", "-o", f"{cuda.name}.o"])
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(lambda command: _run_in(work, command), commands))
    _run_in(work, link)
    for stale in Path(cache_dir).iterdir():
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    work.rename(built.parent)
    return built


def _run_in(folder: Path, command: List[str]) -> None:
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"in {folder}: {' '.join(command)}\n{result.stdout}{result.stderr}")


def load(module_file: Path) -> ModuleType:
    """Imports the module without registering it, so that it never stands in for fastpref._C."""
    spec = importlib.util.spec_from_file_location("cuda_emulation._C", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
