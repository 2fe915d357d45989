"""Build script.

Project metadata lives in pyproject.toml. This file adds the native part: the CUDA extension
``fastpref._C`` built from csrc/ (see csrc/README.md). The .cu files are compiled by nvcc (in
parallel), bindings.cpp by the C++ compiler against pybind11, and the module is linked with the
static CUDA runtime, so it imports without libcudart on the loader path and without a GPU.

FASTPREF_BUILD_CUDA selects what happens:
    unset  build the extension when nvcc is found; without nvcc, or if the build fails, print why
           and install pure Python (the torch and Triton backends)
    "1"    build it; any failure fails the install
    "0"    do not build it
Whenever the extension is left out, an in-place build from an earlier editable install is removed,
so that no stale module outlives the sources it was built from.

The compile takes a while (45 s on 2 busy cores) and pip shows a build's output only with -v, so
its progress, and why the extension was left out if it was, also go to the terminal. An editable install keeps the objects in build/cuda-objects/,
so that reinstalling (with extras, say) recompiles only what changed.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CUDA_EXTENSION = "fastpref._C"
CSRC = "csrc"
CUDA_SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
HEADERS = sorted(glob.glob(os.path.join(CSRC, "*.cuh")) + glob.glob(os.path.join(CSRC, "*.h")))

# sm_80 (A100) and sm_90 (H100/H200) machine code, plus compute_90 PTX for newer GPUs to JIT.
ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
    "-lineinfo",  # source lines in compute-sanitizer and profiler reports; no runtime cost
    "-I" + CSRC, *ARCH_FLAGS,
]
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]
STATIC_CUDART_LIBRARIES = ["cudart_static", "dl", "rt", "pthread"]


def _build_mode():
    value = os.environ.get("FASTPREF_BUILD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"FASTPREF_BUILD_CUDA must be 0, 1 or unset, got {value!r}")
    return value or "auto"


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def _static_cudart_dir(nvcc):
    """The folder holding libcudart_static.a for this nvcc.

    nvcc can be a wrapper script, so its own location says little: ask it (--dryrun prints the
    -L folders it would link with), after CUDA_HOME's usual folders.
    """
    candidates = []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
        candidates += glob.glob(os.path.join(cuda_home, "targets", "*", "lib"))
    dryrun = subprocess.run([nvcc, "--dryrun", "-cudart", "static", "-x", "cu", os.devnull],
                            capture_output=True, text=True)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if "LIBRARIES=" in line:
            candidates += re.findall(r'-L"?([^"\s]+)', line)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "libcudart_static.a")):
            return os.path.normpath(folder)
    raise RuntimeError(f"libcudart_static.a not found next to {nvcc} (looked in {candidates})")


class BuildExtension(build_ext):
    """build_ext that builds fastpref._C with nvcc, or leaves it out as FASTPREF_BUILD_CUDA says."""

    def run(self):
        # setuptools clears `inplace` while building and restores it to copy the results into the
        # source tree, so an editable install is recognised here, before that.
        self._in_source_tree = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        self.check_extensions_list(self.extensions)
        for ext in list(self.extensions):
            if ext.name != CUDA_EXTENSION:
                self.build_extension(ext)
            elif not self._build_cuda_extension(ext):
                # Left out of the outputs, so that nothing tries to install or copy it.
                self.extensions.remove(ext)

    def _build_cuda_extension(self, ext):
        mode = _build_mode()
        if mode == "0":
            self._leave_out(ext, "FASTPREF_BUILD_CUDA=0 was set")
            return False
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError("FASTPREF_BUILD_CUDA=1 but nvcc was not found "
                                   "(looked in $CUDA_HOME/bin and on PATH)")
            self._leave_out(ext, "nvcc was not found (looked in $CUDA_HOME/bin and on PATH)")
            return False
        try:
            try:
                import pybind11
            except ImportError as exc:
                raise RuntimeError(
                    "pybind11 is not importable by the build (with --no-build-isolation, "
                    "install it first)") from exc
            ext.include_dirs += [pybind11.get_include(), CSRC]
            ext.extra_objects += self._compile_cuda_sources(nvcc)
            ext.library_dirs += [_static_cudart_dir(nvcc)]
            self.build_extension(ext)
        except Exception as exc:
            if mode == "1":
                raise
            summary, _, details = str(exc).partition("\n")
            if details:
                print(details, file=sys.stderr, flush=True)
            self._leave_out(ext, f"the build failed: {summary}")
            return False
        return True

    def _compile_cuda_sources(self, nvcc):
        """Compiles every .cu file to an object, in parallel, skipping up-to-date ones."""
        out_dir = self._cuda_object_dir(nvcc)
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for source in CUDA_SOURCES:
            obj = os.path.join(out_dir, os.path.basename(source) + ".o")
            if self.force or not _up_to_date(obj, [source, *HEADERS, __file__]):
                jobs.append((source, obj))
        if jobs:
            _tell_the_terminal(
                f"fastpref: compiling the CUDA extension {CUDA_EXTENSION}: {len(jobs)} of "
                f"{len(CUDA_SOURCES)} files with {nvcc} (about a minute on 2 cores). "
                "FASTPREF_BUILD_CUDA=0 skips it (the torch and Triton backends need none of it).")
        started = time.monotonic()
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        # nvcc compiles the three targets of one file in parallel with the cores left over.
        nvcc_threads = max(1, (os.cpu_count() or 1) // workers)
        failures = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            running = {pool.submit(_run_nvcc, nvcc, *job, nvcc_threads): job[0] for job in jobs}
            for done, future in enumerate(as_completed(running), 1):
                if future.result():
                    failures.append(future.result())
                _tell_the_terminal(f"fastpref: {done}/{len(jobs)} {os.path.basename(running[future])} "
                                   f"{'FAILED' if future.result() else 'compiled'} "
                                   f"({time.monotonic() - started:.0f} s)")
        if failures:
            raise RuntimeError(f"nvcc failed on {len(failures)} of {len(jobs)} files\n"
                               + "\n".join(failures))
        return [os.path.join(out_dir, os.path.basename(s) + ".o") for s in CUDA_SOURCES]

    def _cuda_object_dir(self, nvcc):
        """build/cuda-objects/<nvcc> in the source tree for an editable install (its build_temp is
        new every time), else the build's own temporary folder."""
        if not self._in_source_tree:
            return os.path.join(self.build_temp, "cuda")
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        compiler = hashlib.sha256(f"{nvcc}\n{version}".encode()).hexdigest()[:12]
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "cuda-objects", compiler)

    def _leave_out(self, ext, reason):
        stale = None
        if getattr(self, "_in_source_tree", False):
            package, _, _ = ext.name.rpartition(".")
            package_dir = self.get_finalized_command("build_py").get_package_dir(package)
            stale = os.path.join(package_dir, os.path.basename(self.get_ext_filename(ext.name)))
            if os.path.exists(stale):
                os.remove(stale)
            else:
                stale = None
        message = (
            f"fastpref: the CUDA extension {CUDA_EXTENSION} was not built: {reason.rstrip('.')}. "
            "fastpref is installed as pure Python: the torch and Triton backends work, "
            "backend='cuda' is unavailable. To build it, put nvcc (CUDA 12 or newer) on PATH or "
            "set CUDA_HOME, and reinstall with FASTPREF_BUILD_CUDA=1 (for example "
            "FASTPREF_BUILD_CUDA=1 pip install --no-build-isolation -e ., with pybind11 "
            "installed), which makes any build failure an error."
        )
        if stale:
            message += f" Removed the earlier build {stale}."
        _tell_the_terminal(textwrap.fill(message, width=100, break_on_hyphens=False, break_long_words=False))


def _tell_the_terminal(message):
    """Prints `message`, and also to the terminal where the output is captured (pip without -v)."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as terminal:
            terminal.write(message + "\n")
    except OSError:  # no terminal: CI, a batch job
        pass


def _up_to_date(target, sources):
    if not os.path.exists(target):
        return False
    built = os.path.getmtime(target)
    return all(os.path.getmtime(source) <= built for source in sources)


def _run_nvcc(nvcc, source, obj, threads):
    """Returns None on success, else the command and nvcc's output."""
    command = [nvcc, *NVCC_FLAGS, "--threads", str(threads), "-c", source, "-o", obj]
    print(" ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        return f"{' '.join(command)}\n{output}"
    if output:
        print(output, flush=True)
    return None


setup(
    ext_modules=[
        Extension(
            CUDA_EXTENSION,
            sources=[os.path.join(CSRC, "bindings.cpp")],
            depends=[*CUDA_SOURCES, *HEADERS],
            extra_compile_args=CXX_FLAGS,
            libraries=STATIC_CUDART_LIBRARIES,
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
