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
    (["--op", "dpo"], "invalid choice"),
    (["--op", "preference", "--loss", "kto"], "invalid choice"),
    (["--op", "preference", "--pairs", "0"], "expected a positive integer"),
    (["--op", "preference", "--n", "64"], "--n is for --op logprobs"),
    (["--op", "preference", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["--pairs", "2"], "--pairs is for --op preference"),
    (["--loss", "ipo"], "--loss is for --op preference"),
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


TINY_PREFERENCE = dict(op="preference", pairs=2, seq_len=24, n=96, hidden=16, vocab=300)


def test_preference_op_has_rows_for_every_method_and_loss_with_right_answers():
    # the trainable head checks d_weight as well; the CLI test below runs the frozen one
    rows = bench.run(tiny_config(**TINY_PREFERENCE, heads=("trainable",)), progress=False)

    methods = ["trl-materialized", "liger", "fastpref-torch"]
    assert [(r.loss, r.head, r.method) for r in rows] == [
        (loss, "trainable", method) for loss in ("sigmoid", "ipo", "simpo") for method in methods]
    for row in rows:
        assert (row.pairs, row.seq_len, row.hidden, row.vocab, row.dtype) == (2, 24, 16, 300, "float32")
        if (row.method, row.loss) == ("liger", "ipo"):
            assert row.status == "n/a (no IPO in liger-kernel)"
            continue
        assert row.status == "ok", row
        assert math.isfinite(row.time_ms) and row.time_ms > 0
        assert row.loss_err < 1e-4 and row.grad_err < 1e-4
    table = bench.format_table(rows)
    assert "| liger | ipo | trainable | 2 | 24 | 16 | 300 | float32 | n/a (no IPO in liger-kernel) | n/a | n/a |" in table
    assert "| method | loss | head | B | T | H | V | dtype |" in table


def test_preference_reference_matches_trl_loss_on_the_padded_batch():
    cfg = tiny_config(**TINY_PREFERENCE)
    inputs = bench.make_preference_inputs(cfg)
    for loss_type in ("sigmoid", "ipo", "simpo"):
        ref = bench.preference_reference(inputs, loss_type)
        loss = bench.trl_materialized_loss(inputs.hidden, inputs.weight, inputs.targets,
                                           bench.reference_logps_for(loss_type, inputs), loss_type)
        loss.backward()
        assert torch.allclose(loss.detach(), ref.loss, rtol=1e-5)
        assert torch.allclose(inputs.hidden.grad.reshape(ref.d_hidden.shape), ref.d_hidden, atol=1e-6)
        inputs.hidden.grad = None
    prompt_and_padding = (inputs.targets == bench.IGNORE_INDEX)
    assert prompt_and_padding[:, 0].all() and (~prompt_and_padding).sum(1).min() >= 24 // 4


def test_preference_wrong_loss_is_reported(monkeypatch, capsys):
    real = bench.preference_step_function

    def doubled(method, loss_type, cfg):
        fn = real(method, loss_type, cfg)
        return (lambda *args: 2 * fn(*args)) if method == "fastpref-torch" else fn

    monkeypatch.setattr(bench, "preference_step_function", doubled)
    cfg = tiny_config(**TINY_PREFERENCE, heads=("frozen",), losses=("simpo",))
    assert bench.run_and_report(cfg, "test", progress=False) == 1
    assert "wrong answers (not timed): fastpref-torch (simpo, frozen head)" in capsys.readouterr().err


def test_cli_preference_op_prints_its_table(capsys):
    argv = ["bench", "--op", "preference", "--device", "cpu", "--pairs", "1", "--seq-len", "16",
            "--hidden", "8", "--vocab", "64", "--backends", "torch", "--head", "frozen",
            "--loss", "ipo", "--repeat", "1"]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "# fastpref.PreferenceLoss: forward+backward benchmark" in printed
    assert "| fastpref-torch | ipo | frozen | 1 | 16 | 8 | 64 | float32 |" in printed
    assert "sigmoid |" not in printed and "trainable |" not in printed


def test_shared_machine_is_noted_in_the_report():
    rows = [bench.Row("materialized", "frozen", 8, 4, 16, "float32", "OOM")]
    cfg = tiny_config()
    assert "shared with other jobs" in bench.format_report(rows, cfg, "x", load=(0.5, 3.0))
    assert "shared with other jobs" not in bench.format_report(rows, cfg, "x", load=(0.5, 1.0))
