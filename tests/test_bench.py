"""The benchmark harness on tiny CPU shapes: it runs, checks, reports OOM and writes its report."""
from __future__ import annotations

import math

import pytest
import torch

import fastpref
from fastpref import bench, cli

TINY = dict(n=48, hidden=16, vocab=500, dtype=torch.float32)


def tiny_config(**overrides) -> bench.Config:
    fields = dict(device=torch.device("cpu"), backends=["torch"], warmup=1, repeat=2, **TINY)
    fields.update(overrides)
    return bench.Config(**fields)


def fake_method(monkeypatch, method: str, fn) -> None:
    """Replace one method's computation, leaving the others (and the reference) alone."""
    real = bench.method_function
    monkeypatch.setattr(bench, "method_function", lambda name: fn if name == method else real(name))


def test_rows_have_finite_measurements_for_baseline_and_torch_backend():
    rows = bench.run(tiny_config(), progress=False)

    assert [(r.method, r.head) for r in rows] == [
        ("materialized", "trainable"), ("fastpref-torch", "trainable"),
        ("materialized", "frozen"), ("fastpref-torch", "frozen"),
    ]
    memory_measured = bench.PeakMemory(torch.device("cpu")).supported
    for row in rows:
        assert row.status == "ok"
        assert math.isfinite(row.time_ms) and row.time_ms > 0
        if memory_measured:
            assert math.isfinite(row.peak_mib)
        assert row.logp_err < 1e-4 and row.grad_err < 1e-4
        assert (row.n, row.hidden, row.vocab, row.dtype) == (48, 16, 500, "float32")


def test_cli_prints_table_and_writes_markdown(tmp_path, capsys):
    path = tmp_path / "results" / "bench.md"
    argv = ["bench", "--device", "cpu", "--n", "48", "--hidden", "16", "--vocab", "500",
            "--backends", "torch", "--head", "frozen", "--repeat", "1", "--markdown", str(path)]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "| materialized | frozen | 48 | 16 | 500 | float32 |" in printed
    assert "| fastpref-torch | frozen | 48 | 16 | 500 | float32 |" in printed
    assert "trainable" not in printed.split("| method |")[1]
    report = path.read_text()
    for expected in ("- device: ", "- torch ", "triton ", "python ",
                     "- command: `fastpref bench --device cpu --n 48", "- date: ", "UTC",
                     "| method | head | N | H | V | dtype | time fwd+bwd (ms) |"):
        assert expected in report
    assert printed.strip() == report.strip()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
])
def test_out_of_memory_is_a_row_not_a_crash(monkeypatch, error):
    def out_of_memory(hidden, weight, targets):
        raise error

    fake_method(monkeypatch, bench.BASELINE, out_of_memory)
    rows = bench.run(tiny_config(heads=("trainable",)), progress=False)

    assert [(r.method, r.status) for r in rows] == [("materialized", "OOM"), ("fastpref-torch", "ok")]
    table = bench.format_table(rows)
    assert "| materialized | trainable | 48 | 16 | 500 | float32 | OOM | OOM | OOM |" in table
    fastpref_line = next(line for line in table.splitlines() if "fastpref-torch" in line)
    assert fastpref_line.split(" | ")[8] == "n/a"  # no baseline to compare the memory with


def test_other_errors_are_not_mistaken_for_out_of_memory(monkeypatch):
    def broken(hidden, weight, targets):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    fake_method(monkeypatch, "fastpref-torch", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bench.run(tiny_config(heads=("frozen",)), progress=False)


def test_wrong_answer_is_reported_and_not_timed(monkeypatch, capsys):
    def off_by_a_bit(hidden, weight, targets):
        return bench.materialized_logprobs(hidden, weight, targets) + 0.5

    fake_method(monkeypatch, "fastpref-torch", off_by_a_bit)
    assert bench.run_and_report(tiny_config(heads=("frozen",)), "test", progress=False) == 1

    out = capsys.readouterr()
    assert "| fastpref-torch | frozen | 48 | 16 | 500 | float32 | WRONG | WRONG | WRONG | 5.00e-01 |" in out.out
    assert "wrong answers (not timed): fastpref-torch (frozen head)" in out.err


def test_cpu_peak_memory_sees_an_allocation_and_not_earlier_ones():
    meter = bench.PeakMemory(torch.device("cpu"))
    if not meter.supported:
        pytest.skip("resident-memory peak needs Linux /proc/self/clear_refs")
    mib = 1 << 20

    meter.start()
    block = torch.ones(64 * mib // 4)
    peak = meter.stop()
    assert 60 <= peak <= 72, peak

    del block  # freed memory an allocator might keep must not hide the next run's peak
    leftovers = [torch.ones(4 * mib // 4) for _ in range(8)]
    del leftovers
    meter.start()
    block = torch.ones(16 * mib // 4)
    peak = meter.stop()
    del block
    assert 15 <= peak <= 24, peak

    meter.start()
    assert meter.stop() < 4


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float64"], "invalid choice"),
    (["--n", "0"], "expected a positive integer"),
    (["--repeat", "two"], "expected a positive integer"),
    (["--head", "none"], "invalid choice"),
    (["--backends", "nonesuch"], "invalid choice"),
])
def test_bad_flags_are_rejected_with_a_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_backend_that_cannot_run_on_the_device_is_rejected(capsys):
    unusable = sorted(set(fastpref.registered_backends()) - set(fastpref.available_backends("cpu")))
    if not unusable:
        pytest.skip("every registered backend runs on the CPU here")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cpu", "--backends", unusable[0]])
    assert "cannot run on device cpu" in capsys.readouterr().err
