"""The offline compile gate: every GPU kernel compiles for sm_90 and sm_80 as a GPU would see it.

The CPU interpreter accepts code that the GPU compiler rejects, so the test suite alone cannot
show a kernel will run on a GPU. `fastpref kernels` compiles every Triton kernel at every
configuration its launchers pick, and every csrc/ kernel, for both architectures, and fails on a
compile error, a spill, too much shared memory or a missing wgmma. It runs in a subprocess:
this process runs Triton under the interpreter.
"""
import ast
import io
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from fastpref.audit import ARCHES, AuditRow, audit, violations
from fastpref.audit import cuda_compile, launches, triton_compile
from fastpref.audit.cuda_compile import NVCC_DEVICE_FLAGS, find_nvcc, parse_ptxas_verbose, split_kernel_name
from fastpref.audit.launches import Launch, uncovered_kernels
from fastpref.audit.triton_compile import (CompileJob, CompileResult, is_warp_specialized, read_ptxas_report,
                                           tensor_core_kind, uses_tma)

ROOT = Path(__file__).resolve().parents[1]


def _compiler_env():
    """This environment without the interpreter switch the test suite sets."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _run_python(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=_compiler_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _row(**changes) -> AuditRow:
    fields = dict(language="triton", kernel="fastpref.kernels.m._k", config="bfloat16", arch="sm_90",
                  dtype="bfloat16", registers=128, spill_bytes=0, shared_bytes=1024, tensor_cores="wgmma",
                  atomics=0, compile_s=0.5)
    fields.update(changes)
    return AuditRow(**fields)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    stem = tmp_path / "kernels"
    result = subprocess.run([sys.executable, "-m", "fastpref.cli", "kernels", "--no-progress", "--out", str(stem)],
                            env=_compiler_env(), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    written = json.loads(stem.with_suffix(".json").read_text())
    assert written["machine"]["cores"] >= 1
    rows = [AuditRow(**row) for row in written["rows"]]
    assert all(not violations(row) for row in rows)
    triton_rows = [row for row in rows if row.language == "triton"]
    kernels = {row.short_kernel for row in triton_rows}
    assert {"_forward_kernel", "_logit_gradient_kernel"} <= kernels
    # the persistent, TMA-fed kernels are what sm_90 launches in half precision; sm_80 has no TMA
    hopper_only = {"_persistent_forward_kernel", "_persistent_logit_gradient_kernel"}
    assert {row.short_kernel for row in triton_rows if row.arch == "sm_90"} == kernels
    assert {row.short_kernel for row in triton_rows if row.arch == "sm_80"} == kernels - hopper_only
    persistent = [row for row in triton_rows if row.short_kernel in hopper_only]
    assert persistent and all(row.tensor_cores == "wgmma" and row.tma and row.atomics == 0 for row in persistent)
    # Triton 3.9 does not warp-specialise on sm_90: the report says so rather than assuming it
    assert all(row.warp_specialized is not None for row in triton_rows)
    hopper_half_matmuls = [row for row in triton_rows if row.arch == "sm_90" and row.dtype == "bfloat16"
                           and row.short_kernel in ("_forward_kernel", "_logit_gradient_kernel",
                                                    "_persistent_forward_kernel", "_persistent_logit_gradient_kernel")]
    assert hopper_half_matmuls and all(row.tensor_cores == "wgmma" for row in hopper_half_matmuls)
    # the backward's hot kernel adds nothing with atomics: d_weight and d_hidden come from GEMMs
    assert all(row.atomics == 0 for row in triton_rows if row.short_kernel == "_logit_gradient_kernel")
    if find_nvcc() is not None:
        cuda_sources = {row.kernel.split(":")[0] for row in rows if row.language == "cuda"}
        assert cuda_sources == {path.name for path in (ROOT / "csrc").glob("*.cu")}
        # the CUDA backend's slab epilogues: one thread owns each output, nothing added with atomics
        slab_kernels = {"slab_softmax_kernel", "slab_logit_gradient_kernel", "compensated_accumulate_kernel"}
        slab_rows = [row for row in rows if row.language == "cuda" and row.short_kernel in slab_kernels]
        assert {row.short_kernel for row in slab_rows} == slab_kernels
        assert all(row.atomics == 0 for row in slab_rows)
    report = stem.with_suffix(".md").read_text()
    assert "| kernel | config | arch | registers |" in report and "wgmma" in report


@pytest.mark.slow
def test_gate_rejects_plain_int_globals(tmp_path):
    """A global read by a kernel must be a tl.constexpr: the interpreter takes a plain int, the GPU
    compiler refuses it (a bug the pair-loss kernel once had), and so does the gate."""
    source = textwrap.dedent("""
        import triton
        import triton.language as tl

        SCALE = tl.constexpr(3)


        @triton.jit
        def _scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * SCALE, mask=mask)


        def scale(x):
            _scale_kernel[(1,)](x, x.numel(), BLOCK=16)
    """)
    errors = {}
    for name, text in (("constexpr", source), ("plain_int", source.replace("tl.constexpr(3)", "3"))):
        path = tmp_path / f"scale_{name}.py"
        path.write_text(text)
        result = _run_python(f"""
            import importlib.util, sys, torch
            from fastpref.audit.arches import ARCHES
            from fastpref.audit.launches import recording_launches
            from fastpref.audit.triton_compile import compile_job, run_compile

            name = "fastpref.kernels.scale_{name}"
            spec = importlib.util.spec_from_file_location(name, {str(path)!r})
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            launches = []
            with recording_launches(launches, "scale"):
                module.scale(torch.zeros(7))
            print("ERROR:", run_compile(compile_job(launches[0], ARCHES["sm_90"])).error)
        """)
        assert result.returncode == 0, result.stderr[-4000:]
        errors[name] = result.stdout
    assert "ERROR: None" in errors["constexpr"]
    assert "Cannot access global variable SCALE" in errors["plain_int"]


@pytest.mark.slow
def test_a_kernel_no_configuration_launches_fails_the_gate(tmp_path):
    """Kernels are discovered: a new one that the audit never launches is reported, not skipped."""
    (tmp_path / "unlaunched.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def _new_kernel(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

        def launch(x):
            _new_kernel[(1,)](x, BLOCK=16)
    """))
    result = _run_python(f"""
        import fastpref.kernels
        from fastpref.audit.arches import ARCHES
        from fastpref.audit.launches import discover_kernels, record_launches, uncovered_kernels
        fastpref.kernels.__path__.append({str(tmp_path)!r})
        print("UNCOVERED:", uncovered_kernels(discover_kernels(), record_launches(ARCHES["sm_90"])))
    """)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "UNCOVERED: ['fastpref.kernels.unlaunched._new_kernel']" in result.stdout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_phase_of_the_gate_shows_its_progress_on_a_terminal(monkeypatch, tmp_path):
    """Each phase, with the compilers and the launchers replaced by stand-ins: recording the launches,
    binding them, compiling each Triton binary (named as it finishes), then each csrc/ file per arch."""
    kernel = types.SimpleNamespace(fn=types.SimpleNamespace(__module__="fastpref.kernels.m", __name__="_k"))
    monkeypatch.setattr(launches, "discover_kernels", lambda: {"fastpref.kernels.m._k": kernel})
    monkeypatch.setattr(launches, "record_launches",
                        lambda arch: [Launch(kernel, (index,), {}, f"scenario {index}") for index in range(3)])
    monkeypatch.setattr(triton_compile, "compile_job", lambda launch, arch: CompileJob(
        "fastpref.kernels.m._k", arch.name, arch.capability, (("x", "i32"),), (), (),
        (("num_warps", 4), ("num_stages", launch.args[0] % 2)), "float32"))
    monkeypatch.setattr(triton_compile, "run_compile", lambda job: CompileResult(64, 0, 0, "-", 0, 0.1))
    for source in ("a.cu", "b.cu"):
        (tmp_path / source).write_text("")
    monkeypatch.setattr(cuda_compile, "csrc_dir", lambda: tmp_path)
    monkeypatch.setattr(cuda_compile, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(cuda_compile, "find_cuobjdump", lambda: None)
    monkeypatch.setattr(cuda_compile, "compile_source", lambda nvcc, source, arch, cuobjdump: [
        AuditRow("cuda", f"{source.name}:k", "", arch.name, None, 32, 0, 0, "-", 0, 0.1)])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    result = audit(list(ARCHES), workers=1, progress=True)

    assert len(result.rows) == 2 * 2 + 2 * 2 and not result.uncovered  # 2 distinct binaries and 2 files, per arch
    drawn = terminal.getvalue()
    for phase in ("Triton: recording the launchers' launches", "0/2 architectures",
                  "Triton: binding each launch as a GPU would", "0/6 launches",
                  "Triton: compiled _k for sm_80", "4/4 binaries", "nvcc: b.cu for sm_80", "3/4 compiles",
                  " elapsed, "):
        assert phase in drawn

    monkeypatch.setattr(sys, "stderr", Terminal())
    audit(list(ARCHES), workers=1)
    assert sys.stderr.getvalue() == ""  # without progress=True (fastpref kernels --no-progress), nothing


def test_violations_name_each_problem():
    assert violations(_row()) == []
    assert "spills 8 bytes" in violations(_row(spill_bytes=8))[0]
    assert "over the sm_80 limit" in violations(_row(arch="sm_80", shared_bytes=200 * 1024))[0]
    assert violations(_row(shared_bytes=200 * 1024)) == []  # within sm_90's 227 KiB
    assert "lowers to mma.sync, not wgmma" in violations(_row(tensor_cores="mma.sync"))[0]
    assert violations(_row(tensor_cores="mma.sync", arch="sm_80")) == []
    assert violations(_row(tensor_cores="fma", dtype="float32")) == []
    assert violations(_row(language="cuda", tensor_cores="-")) == []  # csrc/ epilogues: cuBLAS does the GEMMs
    assert "compile error" in violations(_row(error="CompilationError: at 1:2"))[0]
    assert "no ptxas report" in violations(_row(registers=None))[0]


def test_uncovered_kernels_lists_kernels_without_a_launch():
    class Kernel:
        def __init__(self, module, name):
            self.fn = types.SimpleNamespace(__module__=module, __name__=name)

    launched = Kernel("fastpref.kernels.a", "_k")
    discovered = {"fastpref.kernels.a._k": launched, "fastpref.kernels.b._new": Kernel("fastpref.kernels.b", "_new")}
    assert uncovered_kernels(discovered, [Launch(launched, (), {}, "s")]) == ["fastpref.kernels.b._new"]


def test_ptxas_reports_are_read():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fastpref4lossEv' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpref4lossEv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8 bytes cumulative stack size, 16 bytes smem
ptxas info    : Compiling entry function '_ZN8fastpref4headEv' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpref4headEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 1280 bytes smem
ptxas info    : Compiling entry function '_ZN8fastpref4slabEv' for 'sm_80'
ptxas info    : Function properties for _ZN8fastpref4slabEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 0 barriers, 432 bytes cmem[0]
"""
    assert parse_ptxas_verbose(log) == {
        "_ZN8fastpref4lossEv": {"spill_bytes": 8, "registers": 32, "shared_bytes": 16},
        "_ZN8fastpref4headEv": {"spill_bytes": 0, "registers": 128, "shared_bytes": 1280},
        "_ZN8fastpref4slabEv": {"spill_bytes": 0, "registers": 31, "shared_bytes": 0}}  # no smem named
    assert read_ptxas_report(log) == (32, 8, 16)
    assert split_kernel_name("void fastpref::(anonymous namespace)::gemm_kernel<__nv_bfloat16>(float const*)") \
        == ("gemm_kernel", "__nv_bfloat16")
    assert tensor_core_kind("wgmma.mma_async.sync.aligned.m64n128k16", "tt.dot") == "wgmma"
    assert tensor_core_kind("mma.sync.aligned.m16n8k16", "tt.dot") == "mma.sync"
    assert tensor_core_kind("fma.rn.f32", "tt.dot") == "fma"
    assert tensor_core_kind("ld.global", "tt.load") == "-"
    assert uses_tma("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1]")
    assert not uses_tma("cp.async.cg.shared.global [%r1], [%rd2], 16;")
    assert is_warp_specialized("ttg.warp_specialize(%a) attributes {requestedRegisters = array<i32: 24>}")
    assert not is_warp_specialized("scf.for %i = %c0 to %n step %c1")


def test_audit_compiles_csrc_with_the_build_flags():
    tree = ast.parse((ROOT / "setup.py").read_text())
    flags = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "NVCC_FLAGS" for target in node.targets))
    literals = {element.value for element in flags.elts if isinstance(element, ast.Constant)}
    assert set(NVCC_DEVICE_FLAGS) <= literals
