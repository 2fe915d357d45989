"""The benchmark harness on tiny CPU shapes: it runs every op, checks answers before timing,
reports OOM as a row, interleaves its timing rounds and writes its report, rows and plot."""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time

import pytest
import torch

import fastpref
from fastpref import bench, cli
from fastpref.bench import end_to_end, logprobs, loss_head, outputs, peers
from fastpref.bench import report as bench_report
from fastpref.bench.measure import Candidate, PeakMemory, Progress, measure_interleaved
from fastpref.bench.plots import NoPlot, method_figure
from fastpref.bench.reference import IGNORE_INDEX, materialized_logprobs
from fastpref.bench.report import CpuReading, MachineLoad, busy_core_seconds, header, others_busy_cores

CPU = torch.device("cpu")
MEMORY_MEASURED = PeakMemory(CPU).supported


def fake_oom(*args, **kwargs):
    raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")


def recording_progress():
    """A Progress that keeps what a benchmark says of itself: (it, the steps described, the work
    advanced, one entry per advance)."""
    steps, work = [], []
    return Progress(steps.append, work.append), steps, work


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that progress bars draw on it."""

    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# Measurement


@pytest.mark.slow
def test_timing_rounds_go_round_the_methods_after_each_is_checked_warmed_and_weighed():
    calls = []

    def candidate(name, right=True):
        return Candidate(name, step=lambda: calls.append(name) or name, check=lambda output: right)

    progress, steps, work = recording_progress()
    results = measure_interleaved([candidate("a"), candidate("wrong", right=False), candidate("b")],
                                  CPU, warmup=2, repeat=3, progress=progress, work=18.0)

    # a: check + 1 more warm-up + memory; wrong: its check only; b likewise; then 3 rounds of a, b
    assert calls == ["a"] * 3 + ["wrong"] + ["b"] * 3 + ["a", "b"] * 3
    # 6 runs planned per method, 1 of work each: the wrong one's are done when it is judged
    assert work == [3.0] * 3 + [1.0] * 9
    assert steps[:3] == [f"{name}: check, warm-up, memory" for name in ("a", "wrong", "b")]
    assert steps[3:] == [f"timing round {index}/3: {name}" for index in (1, 2, 3) for name in ("a", "b")]
    assert [r.status for r in results] == ["ok", "WRONG", "ok"]
    assert results[1].time_ms is None and results[1].peak_mib is None
    for result in (results[0], results[2]):
        assert len(result.times_ms) == 3 and result.time_ms == sorted(result.times_ms)[1]


@pytest.mark.slow
def test_out_of_memory_and_other_errors_are_results():
    ok = Candidate("ok", step=lambda: 1, check=lambda output: True)

    def broken():
        raise RuntimeError("shape mismatch\nsecond line")

    calls = []

    def breaks_while_timed():
        calls.append(1)
        if len(calls) > 2:  # checked and weighed, then fails in the timed rounds
            raise ValueError("lost the device")

    results = measure_interleaved([Candidate("big", step=fake_oom, check=lambda o: True),
                                   Candidate("broken", step=broken, check=lambda o: True),
                                   Candidate("late", step=breaks_while_timed, check=lambda o: True), ok], CPU, 1, 3)
    assert [r.status for r in results] == ["OOM", "ERROR: RuntimeError: shape mismatch",
                                           "ERROR: ValueError: lost the device", "ok"]
    assert results[3].time_ms is not None and all(r.time_ms is None for r in results[:3])


def test_interrupt_is_not_a_method_error():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_interleaved([Candidate("ctrl-c", step=interrupted, check=lambda o: True)], CPU, 1, 1)


def test_cpu_peak_memory_sees_an_allocation_and_not_earlier_ones():
    meter = PeakMemory(CPU)
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


def machine(**changes) -> MachineLoad:
    fields = dict(cpu="Test CPU", cores=2, usable_cores=2, torch_threads=2, load_start=0.1, others_start=0.0,
                  load_end=1.9, others_during=0.02, own_during=1.95)
    fields.update(changes)
    return MachineLoad(**fields)


@pytest.mark.parametrize("changes, reason", [
    (dict(others_start=1.2), "other processes kept 1.20 of the 2 cores the benchmark runs on busy just before"),
    (dict(others_during=0.6), "other processes kept 0.60 of the 2 cores the benchmark runs on busy on average"),
    (dict(load_end=3.1), "the 1-minute load average ended at 3.10: 1.15 beyond the benchmark's own 1.95 busy cores"),
])
def test_busy_machine_is_warned_of_in_the_report(monkeypatch, changes, reason):
    quiet = header("t", CPU, "x", machine(), [])
    assert ("- CPU: Test CPU, 2 cores, 2 torch threads; 1-minute load average 0.10 at the start, 1.90 at the end;"
            " cores kept busy by other processes: 0.00 just before the measurement, 0.02 during it (by the"
            " benchmark: 1.95)") in quiet
    assert not any("WARNING" in line for line in quiet)

    busy = "\n".join(header("t", CPU, "x", machine(**changes), []))
    assert "- **WARNING**: the machine was busy: " + reason in busy
    assert "rankings can invert" in busy and "OMP_NUM_THREADS=" in busy
    # a GPU's times do not hang on the CPU's elementwise passes: recorded, not warned of
    monkeypatch.setattr(bench_report, "device_name", lambda device: "a GPU")
    assert "WARNING" not in "\n".join(header("t", torch.device("cuda"), "x", machine(**changes), []))


def test_the_cores_other_processes_keep_busy_are_read_from_the_clocks():
    start = CpuReading(wall_s=10.0, own_s=5.0, busy_s=100.0, load=1.0)
    assert others_busy_cores(start, CpuReading(12.0, 8.0, 104.0, 1.5)) == pytest.approx(0.5)  # 4 busy, 3 its own
    assert others_busy_cores(start, CpuReading(12.0, 9.0, 104.0, 1.5)) == 0.0  # tick rounding: never below 0
    assert others_busy_cores(start, CpuReading(12.0, 8.0, None, None)) is None  # off Linux
    before = busy_core_seconds()
    if before is None:
        pytest.skip("busy core time needs Linux /proc/stat")
    began = time.process_time()
    while time.process_time() - began < 0.3:  # this process's own work shows as busy cores
        pass
    assert busy_core_seconds() - before >= 0.2


@pytest.mark.slow
def test_the_machine_and_its_load_go_into_the_report_the_rows_and_the_console(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_report, "others_busy_cores", lambda start, end: 1.5)
    assert bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test", out=str(tmp_path / "lp"),
                        progress=False) == 0

    console = capsys.readouterr().err
    # said before the measurement (there is still time to stop it) and after
    assert console.count("warning: the machine was busy: other processes kept 1.50 of the") == 2
    assert "Measuring anyway." in console
    written = json.loads((tmp_path / "lp.json").read_text())
    assert written["machine"]["others_start"] == written["machine"]["others_during"] == 1.5
    assert written["machine"]["torch_threads"] == torch.get_num_threads()
    assert {"cpu", "cores", "usable_cores", "load_start", "load_end", "own_during"} <= set(written["machine"])
    assert [row["method"] for row in written["rows"]] == ["materialized", "fastpref-torch", "gemm-floor"]
    markdown = (tmp_path / "lp.md").read_text()
    assert "- CPU: " in markdown and "1.50 during it" in markdown and "- **WARNING**: the machine was busy" in markdown

    monkeypatch.setattr(bench_report, "others_busy_cores", lambda start, end: 0.0)
    monkeypatch.setattr(bench_report, "load_average", lambda: 0.0)
    bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test", progress=False)
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# logprobs


def tiny_logprobs(**overrides) -> logprobs.Config:
    fields = dict(device=CPU, n=48, hidden=16, vocab=500, dtype=torch.float32, backends=["torch"], peers=[],
                  repeat=2)
    fields.update(overrides)
    return logprobs.Config(**fields)


def test_logprobs_rows_are_right_and_measured():
    rows = []
    progress, steps, work = recording_progress()
    logprobs.run(tiny_logprobs(), rows, progress)

    assert sum(work) == pytest.approx(logprobs.planned_work(tiny_logprobs()))
    assert "frozen head: timing round 2/2: fastpref-torch" in steps

    assert [(r.method, r.head) for r in rows] == [
        ("materialized", "trainable"), ("fastpref-torch", "trainable"), ("gemm-floor", "trainable"),
        ("materialized", "frozen"), ("fastpref-torch", "frozen"), ("gemm-floor", "frozen")]
    for row in rows:
        assert row.status == "ok"
        assert math.isfinite(row.time_ms) and row.time_ms > 0
        assert 0 < row.scored < row.n
        flops = (8 if row.head == "trainable" else 4) * row.scored * 16 * 500
        assert row.tflops == pytest.approx(flops / (row.time_ms * 1e-3) / 1e12)
        assert (row.peak_mib is not None) == MEMORY_MEASURED
        if row.method != "gemm-floor":  # the floor computes no log-probs to check
            assert row.logp_err < 1e-4 and row.grad_err < 1e-4
    table = logprobs.format_table(rows)
    floor = {row.head: row.time_ms for row in rows if row.method == "gemm-floor"}
    fastpref_row = next(row for row in rows if row.method == "fastpref-torch" and row.head == "frozen")
    assert f"| {fastpref_row.time_ms / floor['frozen']:.2f}x |" in table
    assert "| gemm-floor | trainable | 48 | 16 | 500 | float32 |" in table and "| 1.00x |" in table


# ---------------------------------------------------------------------------------------------
# outputs


@pytest.mark.slow
def test_outputs_rows_measure_every_variant_against_log_probs_alone():
    cfg = outputs.Config(device=CPU, n=40, hidden=16, vocab=300, dtype=torch.float32, backend="torch", repeat=1)
    rows = []
    progress, steps, work = recording_progress()
    outputs.run(cfg, rows, progress)
    assert sum(work) == pytest.approx(outputs.planned_work(cfg))
    assert [(r.variant, r.head) for r in rows] == [(v, h) for h in ("trainable", "frozen") for v in outputs.VARIANTS]
    for row in rows:
        assert row.status == "ok", row
        assert math.isfinite(row.time_ms) and row.time_ms > 0
        assert (row.logp_err is None) == (row.variant.startswith("soft cap"))
        assert row.logp_err is None or row.logp_err < 1e-4
    table = outputs.format_table(rows)
    base = next(r for r in rows if r.variant == "log_probs" and r.head == "frozen")
    entropy = next(r for r in rows if r.variant == "entropy (in the loss)" and r.head == "frozen")
    assert f"| {entropy.time_ms / base.time_ms:.2f}x |" in table


def test_outputs_refuses_a_backend_that_cannot_run():
    parser = argparse.ArgumentParser()
    outputs.add_arguments(parser)
    with pytest.raises(SystemExit):
        outputs.config_from_args(parser.parse_args(["--device", "cpu", "--backend", "cuda"]), parser)


def test_gemm_floor_does_the_heads_flops(monkeypatch):
    """Four [N, H] x [H, chunk] matmuls per vocabulary chunk for a trainable head, two for a frozen one."""
    calls = []
    monkeypatch.setattr(logprobs, "GEMM_FLOOR_COLUMNS", 200)
    hidden, weight = torch.randn(7, 5), torch.randn(500, 5)
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.shape[0] * a.shape[1] * b.shape[1])
                        or real_matmul(a, b))
    logprobs.gemm_floor_step(hidden, weight, "trainable")
    assert 2 * sum(calls) == 8 * 7 * 5 * 500
    calls.clear()
    logprobs.gemm_floor_step(hidden, weight, "frozen")
    assert 2 * sum(calls) == 4 * 7 * 5 * 500


HAS_TORCH_NATIVE = hasattr(torch.nn, "LinearCrossEntropyOptions")


@pytest.mark.slow
def test_logprobs_peers_are_measured_or_say_why_not():
    """On a CPU PyTorch's head runs (torch >= 2.13) and is checked like every method; Liger's CuTe
    head and QuACK are rows that give the reason."""
    rows = []
    logprobs.run(tiny_logprobs(peers=list(logprobs.PEERS), heads=("trainable",)), rows)

    assert [r.method for r in rows] == ["materialized", *logprobs.PEERS, "fastpref-torch", "gemm-floor"]
    by_method = {r.method: r for r in rows}
    native = by_method["torch-native"]
    if HAS_TORCH_NATIVE:
        assert native.status == "ok" and native.logp_err < 1e-4 and native.grad_err < 1e-4
        assert native.tflops == pytest.approx(8 * native.scored * 16 * 500 / (native.time_ms * 1e-3) / 1e12)
    else:
        assert native.status.startswith("n/a (needs torch >= 2.13")
    assert by_method["liger-cute"].status == (
        "n/a (Liger's CuTe head needs an sm_90 GPU; elsewhere Liger runs a torch fallback)")
    for method in ("quack", "quack-chunked"):
        assert by_method[method].status == "n/a (QuACK's kernels need a CUDA GPU, sm_90 or newer)"
        assert by_method[method].time_ms is None
    table = logprobs.format_table(rows)
    assert "| quack-chunked | trainable | 48 | 16 | 500 | float32 | n/a (QuACK's kernels need a CUDA GPU" in table
    assert not logprobs.failures(rows)


@pytest.mark.slow
def test_logprobs_summed_loss_peer_is_checked_against_the_uniform_gradient(monkeypatch):
    """quack-chunked's row: a head returning the summed log-prob of the scored tokens, backpropagated
    with 1, against the reference for that gradient (here a torch stand-in for QuACK; a wrong one is
    caught)."""
    def summed(device, dtype, vocab):
        return lambda h, w, t: materialized_logprobs(h, w, t).sum()

    monkeypatch.setattr(peers, "quack_chunked_sum", summed)
    rows = []
    logprobs.run(tiny_logprobs(peers=["quack-chunked"]), rows)
    for row in (r for r in rows if r.method == "quack-chunked"):
        assert row.status == "ok" and row.logp_err < 1e-5 and row.grad_err < 1e-5

    monkeypatch.setattr(peers, "quack_chunked_sum",
                        lambda device, dtype, vocab: lambda h, w, t: 1.01 * materialized_logprobs(h, w, t).sum())
    rows = []
    logprobs.run(tiny_logprobs(peers=["quack-chunked"], heads=("frozen",)), rows)
    assert next(r for r in rows if r.method == "quack-chunked").status == "WRONG"


def test_peers_say_what_they_are_missing(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(peers, "capability", lambda device: (8, 0))
    assert peers.liger_cute(cuda, torch.bfloat16) == "n/a (Liger's CuTe head needs sm_90, this GPU is sm_80)"
    assert peers.quack(cuda, torch.bfloat16) == "n/a (QuACK's kernels need sm_90 or newer, this GPU is sm_80)"
    monkeypatch.setattr(peers, "capability", lambda device: (9, 0))
    assert peers.liger_cute(cuda, torch.float32) == "n/a (Liger's CuTe head takes bfloat16 only, not torch.float32)"
    assert peers.quack(cuda, torch.float32) == "n/a (QuACK's head takes bfloat16 or float16, not torch.float32)"
    assert peers.quack_chunked_sum(cuda, torch.bfloat16, 1001) == (
        "n/a (QuACK's chunked head needs a vocabulary that is a multiple of 8)")
    for reason in (peers.liger_cute(cuda, torch.bfloat16), peers.quack(cuda, torch.bfloat16),
                   peers.quack_chunked_sum(cuda, torch.bfloat16, 1000)):
        assert isinstance(reason, str) and reason.startswith("n/a (") and "CuTe DSL" in reason
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    assert peers.torch_native(CPU, torch.float32).startswith(
        f"n/a (needs torch >= 2.13 for F.linear_cross_entropy, this is torch {torch.__version__})")


def test_peers_get_the_scored_rows():
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    weight = torch.randn(7, 4)
    targets = torch.randint(0, 7, (3, 5))
    targets[:, :2] = IGNORE_INDEX
    seen = []

    def head(h, w, t):
        seen.append((h.shape, t.clone()))
        return materialized_logprobs(h, w, t)

    logp = peers.on_scored_rows(head)(hidden, weight, targets)
    assert seen[0][0] == (9, 4) and (seen[0][1] != IGNORE_INDEX).all()
    assert torch.allclose(logp, materialized_logprobs(hidden, weight, targets))
    logp.sum().backward()
    assert (hidden.grad[:, :2] == 0).all() and hidden.grad[:, 2:].abs().sum() > 0

    rows, row_targets = peers.scored_rows_padded(hidden.detach().reshape(15, 4), targets.reshape(15), 8)
    assert rows.shape == (16, 4) and (row_targets[:9] != IGNORE_INDEX).all()
    assert (row_targets[9:] == IGNORE_INDEX).all()
    assert (rows[9:] == 0).all()


@pytest.mark.slow
def test_cli_logprobs_prints_and_writes_report_and_rows(tmp_path, capsys):
    stem = tmp_path / "results" / "lp"
    argv = ["bench", "logprobs", "--device", "cpu", "--n", "48", "--hidden", "16", "--vocab", "500",
            "--backends", "torch", "--head", "frozen", "--repeat", "1", "--peers", "--out", str(stem)]

    assert cli.main(argv) == 0

    printed = capsys.readouterr()
    assert "| materialized | frozen | 48 | 16 | 500 | float32 |" in printed.out
    assert "| fastpref-torch | frozen | 48 | 16 | 500 | float32 |" in printed.out
    report = (tmp_path / "results" / "lp.md").read_text()
    for expected in ("- device: ", "- torch ", "triton ", "liger-kernel ", "python ",
                     "- command: `fastpref bench logprobs --device cpu --n 48", "- date: ", "UTC"):
        assert expected in report
    assert printed.out.strip() == report.replace("\n![lp](lp.png)\n", "").strip()
    rows = json.loads((tmp_path / "results" / "lp.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["materialized", "fastpref-torch", "gemm-floor"]
    # one size: a bar per method, and the console says what was written
    assert (tmp_path / "results" / "lp.png").stat().st_size > 10_000
    assert "![lp](lp.png)" in report
    assert f"wrote {stem}.md, {stem}.json, {stem}.png" in printed.err


@pytest.mark.slow
def test_logprobs_wrong_answer_is_reported_and_not_timed(monkeypatch, capsys):
    real = logprobs.method_function
    def shifted(name, device, dtype, *count):
        fn = real(name, device, dtype, *count)
        return (lambda h, w, t: fn(h, w, t) + 0.5) if name == "fastpref-torch" else fn

    monkeypatch.setattr(logprobs, "method_function", shifted)

    assert bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test", progress=False) == 1

    out = capsys.readouterr()
    assert "| fastpref-torch | frozen | 48 | 16 | 500 | float32 | WRONG |" in out.out
    assert "failed (not timed): fastpref-torch (frozen head): WRONG" in out.err


@pytest.mark.slow
def test_logprobs_broken_method_is_a_row_and_the_others_are_measured(monkeypatch, capsys):
    real = logprobs.method_function

    def broken(h, w, t):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(logprobs, "method_function",
                        lambda name, device, dtype, *count: broken if name == "materialized"
                        else real(name, device, dtype, *count))
    assert bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test", progress=False) == 1

    out = capsys.readouterr()
    assert "| materialized | frozen | 48 | 16 | 500 | float32 | ERROR: TypeError: unsupported operand |" in out.out
    fastpref_row = next(line for line in out.out.splitlines() if line.startswith("| fastpref-torch | frozen"))
    assert "ERROR" not in fastpref_row and "WRONG" not in fastpref_row and "OOM" not in fastpref_row
    assert "failed (not timed): materialized (frozen head): ERROR: TypeError: unsupported operand" in out.err


# ---------------------------------------------------------------------------------------------
# loss-head


def tiny_loss_head(**overrides) -> loss_head.Config:
    fields = dict(device=CPU, models=["tiny"], tokens=[96], seq_len=24, losses=list(loss_head.LOSSES),
                  dtype=torch.float32, backends=["torch"], repeat=1, shapes={"tiny": (16, 300)})
    fields.update(overrides)
    return loss_head.Config(**fields)


@pytest.mark.slow
def test_loss_head_has_right_answers_for_every_method_and_loss():
    rows = []
    progress, steps, work = recording_progress()
    loss_head.run(tiny_loss_head(heads=("trainable",)), rows, progress)

    # methods that cannot run here (n/a rows) take none of the planned work, and the bar still ends at 100%
    assert sum(work) == pytest.approx(loss_head.planned_work(tiny_loss_head(heads=("trainable",))))
    assert "tiny N=96 simpo trainable: timing round 1/1: fastpref-torch-two-op" in steps

    methods = ["materialized", "trl", "liger", "cce", "torch-native", "liger-cute", "quack", "fastpref-torch",
               "fastpref-torch-two-op"]
    assert [(r.loss, r.method) for r in rows] == [(loss, m) for loss in loss_head.LOSSES for m in methods]
    unavailable = {"liger-cute": peers.liger_cute(CPU, torch.float32), "quack": peers.quack(CPU, torch.float32)}
    if not HAS_TORCH_NATIVE:
        unavailable["torch-native"] = peers.torch_native(CPU, torch.float32)
    for row in rows:
        assert (row.model, row.n, row.hidden, row.vocab, row.head) == ("tiny", 96, 16, 300, "trainable")
        assert 96 - 4 * 24 // 4 <= row.scored < 96
        if (row.method, row.loss) == ("liger", "ipo"):
            assert row.status == "n/a (no IPO in liger-kernel)"
            continue
        if row.method in unavailable:
            assert row.status == unavailable[row.method]
            continue
        assert row.status == "ok", row
        assert row.loss_err < 1e-4 and row.grad_err < 1e-4
        assert row.tflops == pytest.approx(8 * row.scored * 16 * 300 / (row.time_ms * 1e-3) / 1e12)
        if MEMORY_MEASURED:
            floor_mib = (96 * 16 + 300 * 16) * 4 / (1 << 20)
            assert row.extra_mib == pytest.approx(row.peak_mib - floor_mib)
    table = loss_head.format_table(rows)
    assert "| tiny (H=16, V=300) | 96 | ipo | trainable | liger | n/a (no IPO in liger-kernel) |" in table


def test_loss_head_reference_is_trl_loss_on_the_padded_batch():
    inputs = loss_head.make_inputs(2, 24, 16, 300, torch.float32, CPU)
    assert (inputs.targets[:, 0] == loss_head.IGNORE_INDEX).all()
    assert ((inputs.targets != loss_head.IGNORE_INDEX).sum(1) >= 24 - 24 // 4).all()
    for loss_type in loss_head.LOSSES:
        ref = loss_head.loss_reference(inputs, loss_type)
        loss = loss_head.materialized_loss(inputs.hidden, inputs.weight, inputs.targets,
                                           loss_head.reference_logps_for(loss_type, inputs), loss_type)
        loss.backward()
        assert torch.allclose(loss.detach(), ref.loss, rtol=1e-5)
        assert torch.allclose(inputs.hidden.grad.reshape(ref.d_hidden.shape), ref.d_hidden, atol=1e-6)
        inputs.hidden.grad = None


@pytest.mark.slow
def test_loss_head_out_of_memory_and_wrong_answers_are_rows(monkeypatch, capsys):
    real = loss_head.loss_function

    def patched(method, loss_type, head, device, dtype):
        if method == "materialized":
            return fake_oom
        fn = real(method, loss_type, head, device, dtype)
        return (lambda *args: 2 * fn(*args)) if method == "fastpref-torch" else fn

    monkeypatch.setattr(loss_head, "loss_function", patched)
    cfg = tiny_loss_head(losses=["simpo"], heads=("frozen",), peers=["materialized"])
    assert bench.run_op(loss_head, cfg, "test", progress=False) == 1

    out = capsys.readouterr()
    assert "| tiny (H=16, V=300) | 96 | simpo | frozen | materialized | OOM |" in out.out
    assert "failed (not timed): fastpref-torch (tiny, N=96, simpo, frozen head): WRONG" in out.err


@pytest.mark.slow
def test_loss_head_method_that_cannot_be_set_up_is_a_row(monkeypatch, capsys):
    real = loss_head.loss_function

    def patched(method, loss_type, head, device, dtype):
        if method == "materialized":
            raise ImportError("liger_kernel.chunked_loss is missing")
        return real(method, loss_type, head, device, dtype)

    monkeypatch.setattr(loss_head, "loss_function", patched)
    cfg = tiny_loss_head(losses=["sigmoid"], heads=("trainable",), peers=["materialized"])
    assert bench.run_op(loss_head, cfg, "test", progress=False) == 1

    out = capsys.readouterr()
    assert "| materialized | ERROR: ImportError: liger_kernel.chunked_loss is missing |" in out.out
    assert "| trainable | fastpref-torch | " in out.out and out.out.count("| ERROR: ") == 1


@pytest.mark.slow
def test_cli_loss_head_sweep_writes_plot(tmp_path, capsys):
    stem = tmp_path / "lh"
    argv = ["bench", "loss-head", "--device", "cpu", "--hidden", "8", "--vocab", "64", "--tokens", "32", "64",
            "--seq-len", "16", "--loss", "ipo", "--peers", "materialized", "--backends", "torch",
            "--repeat", "1", "--out", str(stem)]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "| custom (H=8, V=64) | 64 | ipo | frozen | fastpref-torch |" in printed
    assert "sigmoid" not in printed.split("| head shape |")[1]
    assert (tmp_path / "lh.png").stat().st_size > 10_000
    assert "![lh](lh.png)" in (tmp_path / "lh.md").read_text()


def test_cli_loss_head_at_one_size_writes_a_bar_plot(tmp_path, capsys):
    stem = tmp_path / "one"
    argv = ["bench", "loss-head", "--device", "cpu", "--hidden", "8", "--vocab", "64", "--tokens", "32",
            "--seq-len", "16", "--peers", "materialized", "--backends", "torch", "--head", "frozen",
            "--repeat", "1", "--out", str(stem)]

    assert cli.main(argv) == 0

    assert (tmp_path / "one.png").stat().st_size > 10_000
    assert f"wrote {stem}.md, {stem}.json, {stem}.png" in capsys.readouterr().err


@pytest.mark.slow
def test_no_plot_is_said_with_its_reason(monkeypatch, tmp_path, capsys):
    failed = [logprobs.Row("materialized", "frozen", 48, 43, 16, 500, "float32", status="OOM")]
    with pytest.raises(NoPlot, match="no method has a measured value"):
        method_figure(failed, tmp_path / "x.png", panel_rows=["p"], panel_of=lambda r: "p", x_of=lambda r: r.n,
                      x_label="N", title="t")

    def cannot_draw(rows, cfg, path):
        raise NoPlot("a reason")

    monkeypatch.setattr(logprobs, "plot", cannot_draw)
    bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test", out=str(tmp_path / "lp"), progress=False)
    err = capsys.readouterr().err
    assert f"no {tmp_path / 'lp.png'}: a reason" in err
    assert f"wrote {tmp_path / 'lp.md'}, {tmp_path / 'lp.json'}\n" in err


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> str:
    """The embedded default model and tokenizer, saved as a Hugging Face folder."""
    from fastpref.train.default_assets import default_model, default_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = default_tokenizer()
    default_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_loss_head_on_a_models_real_hidden_states(tiny_model_folder):
    """--hidden-from: the model's final hidden states on HH-RLHF pairs and its own head; targets are
    the next tokens of each response, so the reference's log-probs are the model's own."""
    from transformers import AutoModelForCausalLM

    inputs = loss_head.real_inputs(tiny_model_folder, 2, 48, torch.float32, CPU)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    assert inputs.hidden.shape == (4, 48, model.config.hidden_size)
    assert torch.equal(inputs.weight, model.get_output_embeddings().weight.detach())
    scored = inputs.targets != loss_head.IGNORE_INDEX
    assert scored.any(dim=1).all() and not scored[:, 0].any()  # a prompt precedes every response
    row = int(scored.sum(1).argmax())
    positions = scored[row].nonzero().squeeze(1)
    # each scored position's target is the token after it; the model's logits there give its log-prob
    tokens = inputs.targets[row, positions]
    hidden = inputs.hidden[row, positions].detach()
    logits = hidden @ inputs.weight.t()
    assert torch.allclose(torch.log_softmax(logits, -1).gather(1, tokens[:, None]).sum(),
                          inputs.policy_logps[row], rtol=1e-5)

    rows = []
    loss_head.run(tiny_loss_head(models=[tiny_model_folder], hidden_from=tiny_model_folder, tokens=[192],
                                 seq_len=48, losses=["sigmoid"], heads=("trainable",), shapes=None), rows)
    available = [r for r in rows if not r.status.startswith("n/a (")]
    assert [r.method for r in available] == ["materialized", "trl", "liger", "cce"] + (
        ["torch-native"] if HAS_TORCH_NATIVE else []) + ["fastpref-torch", "fastpref-torch-two-op"]
    assert [r.status for r in available] == ["ok"] * len(available)
    assert {(r.hidden, r.vocab) for r in rows} == {(model.config.hidden_size, model.config.vocab_size)}


def test_loss_head_real_hidden_states_need_enough_pairs(tiny_model_folder):
    with pytest.raises(ValueError, match="pairs that tokenize, 100000 wanted"):
        loss_head.real_inputs(tiny_model_folder, 100_000, 32, torch.float32, CPU)


# ---------------------------------------------------------------------------------------------
# end-to-end


def tiny_end_to_end(**overrides) -> end_to_end.Config:
    fields = dict(device=CPU, model="llama-tiny", seq_lens=[16], pairs=[1, 2], dtype=torch.float32, repeat=1,
                  memory_budget_mib=4096.0, max_pairs_limit=4)
    fields.update(overrides)
    return end_to_end.Config(**fields)


@pytest.mark.slow
def test_end_to_end_methods_agree_on_the_loss_and_are_measured():
    rows = []
    end_to_end.run(tiny_end_to_end(find_max_pairs=False), rows)

    assert [(r.pairs, r.method) for r in rows] == [(p, m) for p in (1, 2) for m in end_to_end.METHODS]
    for row in rows:
        assert row.status == "ok", row
        assert row.tokens_per_s == pytest.approx(row.tokens / (row.time_ms * 1e-3))
        assert row.max_pairs is None
        assert 0.3 < row.loss < 1.1 and row.grad_norm > 0  # near log 2: not saturated, real gradients
        if row.method != "trl-padded":
            assert row.loss_err < 1e-5 and row.grad_err < 1e-4
    one_pair = [r for r in rows if r.pairs == 1]
    assert len({r.tokens for r in one_pair}) == 1
    assert max(r.loss for r in one_pair) - min(r.loss for r in one_pair) < 1e-5


def test_end_to_end_wrong_gradient_is_caught(monkeypatch, capsys):
    real = end_to_end.step_function

    def doubled_gradient(contestant, pairs, device):
        step = real(contestant, pairs, device)
        if contestant.method != "fastpref-packed":
            return step

        def twice():
            step()
            return step()  # gradients accumulate twice, the loss is right

        return twice

    monkeypatch.setattr(end_to_end, "step_function", doubled_gradient)
    cfg = tiny_end_to_end(pairs=[2], find_max_pairs=False, methods=["trl-padded", "fastpref-packed"])
    assert bench.run_op(end_to_end, cfg, "test", progress=False) == 1
    assert "failed (not timed): fastpref-packed (seq 16, 2 pairs): WRONG" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_broken_method_is_a_row_and_the_others_are_measured(monkeypatch, capsys):
    real = end_to_end.step_function

    def broken_packed(contestant, pairs, device):
        if contestant.method == "fastpref-packed":
            raise RuntimeError("mask shape [3, 3] does not match [4, 4]")
        return real(contestant, pairs, device)

    monkeypatch.setattr(end_to_end, "step_function", broken_packed)
    cfg = tiny_end_to_end(pairs=[2], max_pairs_limit=2, methods=["trl-padded", "fastpref-packed", "fastpref-packed-prefix"])
    rows = []
    end_to_end.run(cfg, rows)
    by_method = {row.method: row for row in rows}
    assert by_method["fastpref-packed"].status == "ERROR: RuntimeError: mask shape [3, 3] does not match [4, 4]"
    assert by_method["fastpref-packed"].max_pairs.startswith("ERROR: RuntimeError")
    for method in ("trl-padded", "fastpref-packed-prefix"):
        assert by_method[method].status == "ok" and by_method[method].tokens_per_s > 0
        assert by_method[method].max_pairs == ">= 2"


def test_padded_batch_targets_are_the_next_response_token():
    pair = end_to_end.Pair([5, 6, 7], [8, 9], [10], row=0)
    batch = end_to_end.pad_pairs([pair], CPU)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.targets.tolist() == [[-100, -100, 8, 9, -100], [-100, -100, 10, -100, -100]]
    assert pair.tokens == 3 + 2 + 3 + 1


@pytest.mark.parametrize("largest, limit, expected", [(5, 64, "5"), (1, 64, "1"), (0, 64, "0"),
                                                      (64, 64, ">= 64"), (100, 48, ">= 48"), (40, 48, "40")])
def test_max_pairs_search_finds_the_largest_count_that_fits(monkeypatch, largest, limit, expected):
    tried = []

    def fits(contestant, count, seq_len, cfg, reset):
        tried.append(count)
        return count <= largest

    monkeypatch.setattr(end_to_end, "fits", fits)
    cfg = tiny_end_to_end(max_pairs_limit=limit)
    progress, steps, work = recording_progress()
    assert end_to_end.max_pairs(None, 16, cfg, None, progress) == expected
    assert len(tried) == len(set(tried)) <= 2 * math.log2(limit) + 2
    assert steps == [f"trying {count}" for count in tried]
    # however many steps the search took, it advanced what was planned for it
    assert sum(work) == end_to_end.search_work(cfg, 16) and min(work) >= 0


@pytest.mark.slow
def test_max_pairs_with_a_memory_budget_on_cpu():
    if not MEMORY_MEASURED:
        pytest.skip("resident-memory peak needs Linux /proc/self/clear_refs")
    cfg = tiny_end_to_end(methods=["trl-padded"], pairs=[1], max_pairs_limit=4)
    rows = []
    progress, steps, work = recording_progress()
    end_to_end.run(cfg, rows, progress)
    assert rows[0].max_pairs == ">= 4"
    assert sum(work) == pytest.approx(end_to_end.planned_work(cfg))
    assert "seq 16, trl-padded: max pairs: trying 4" in steps
    rows = []
    end_to_end.run(tiny_end_to_end(methods=["trl-padded"], pairs=[1], max_pairs_limit=4, memory_budget_mib=0.01), rows)
    assert rows[0].max_pairs == "0"
    assert "Largest pairs per step that fits" in end_to_end.format_table(rows)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
@pytest.mark.parametrize("bare", [False, True], ids=["all", "no-op"])
def test_all_runs_every_op_and_writes_its_files(monkeypatch, tmp_path, capsys, bare):
    monkeypatch.setattr(logprobs, "defaults", lambda device: dict(
        n=32, hidden=8, vocab=64, dtype="float32", warmup=1, repeat=1))
    monkeypatch.setattr(outputs, "defaults", lambda device: dict(
        n=32, hidden=8, vocab=64, dtype="float32", warmup=1, repeat=1))
    monkeypatch.setattr(loss_head, "defaults", lambda device: dict(
        models=["small"], tokens=[32, 64], seq_len=16, losses=["sigmoid"], dtype="float32", warmup=1, repeat=1))
    monkeypatch.setitem(loss_head.HEAD_SHAPES, "small", (8, 64))
    monkeypatch.setattr(end_to_end, "defaults", lambda device: dict(
        model="llama-tiny", seq_lens=[16], pairs=[1, 2], dtype="float32", warmup=1, repeat=1,
        memory_budget_mib=4096.0, max_pairs_limit=2))

    assert cli.main(["bench"] if bare else ["bench", "all", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    for title in (logprobs.TITLE, outputs.TITLE, loss_head.TITLE, end_to_end.TITLE):
        assert f"# {title}" in printed
    if bare:
        assert not list(tmp_path.iterdir())
        return
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["cpu-end-to-end.json", "cpu-end-to-end.md", "cpu-end-to-end.png", "cpu-logprobs.json",
                     "cpu-logprobs.md", "cpu-logprobs.png", "cpu-loss-head.json", "cpu-loss-head.md",
                     "cpu-loss-head.png", "cpu-outputs.json", "cpu-outputs.md", "cpu-outputs.png"]


@pytest.mark.slow
def test_progress_shows_each_step_and_the_time_left_on_a_terminal(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert bench.run_op(logprobs, tiny_logprobs(), "test") == 0

    drawn = terminal.getvalue()
    for step in ("logprobs: reference", "logprobs: trainable head: materialized: check, warm-up, memory",
                 "logprobs: frozen head: timing round 2/2: gemm-floor"):
        assert step in drawn
    assert re.search(r"\d+%\|.*\| \[\d\d:\d\d elapsed, \d\d:\d\d left\]", drawn)  # an estimate, not "?"
    assert "%|" not in capsys.readouterr().out  # the report on stdout stays clean


@pytest.mark.slow
def test_progress_stays_out_of_logs(capsys):
    """stderr not a terminal (a CI log, a pipe): no bar, only the report and the lines that matter."""
    assert bench.run_op(logprobs, tiny_logprobs(heads=("frozen",)), "test") == 0
    printed = capsys.readouterr()
    assert "%|" not in printed.err and "%|" not in printed.out
    assert printed.out.startswith("# " + logprobs.TITLE)


def test_interrupted_run_keeps_what_it_measured(monkeypatch, tmp_path, capsys):
    def run_then_interrupt(cfg, rows, progress):
        rows.append(logprobs.Row("materialized", "frozen", n=48, scored=43, hidden=16, vocab=500, dtype="float32",
                                 time_ms=1.0, peak_mib=2.0, logp_err=0.0, grad_err=0.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(logprobs, "run", run_then_interrupt)
    assert bench.run_op(logprobs, tiny_logprobs(), "test", out=str(tmp_path / "x"), progress=False) == 130
    report = (tmp_path / "x.md").read_text()
    assert "| materialized | frozen | 48 | 16 | 500 | float32 | 1.0 | - | - | 2.0 |" in report
    assert "**Interrupted**" in report


@pytest.mark.parametrize("argv, message", [
    (["logprobs", "--dtype", "float64"], "invalid choice"),
    (["logprobs", "--n", "0"], "expected a positive integer"),
    (["logprobs", "--repeat", "two"], "expected a positive integer"),
    (["logprobs", "--head", "none"], "invalid choice"),
    (["logprobs", "--backends", "nonesuch"], "invalid choice"),
    (["dpo"], "invalid choice"),
    (["logprobs", "--device", "meta"], "--device must be cpu or cuda"),
    (["loss-head", "--device", "cpu", "--loss", "kto"], "invalid choice"),
    (["loss-head", "--device", "cpu", "--tokens", "100", "--seq-len", "16"], "not a multiple of 2 * --seq-len = 32"),
    (["loss-head", "--device", "cpu", "--hidden", "64"], "--hidden and --vocab go together"),
    (["loss-head", "--device", "cpu", "--hidden", "8", "--vocab", "9", "--model", "gemma2-2b"], "give one of --model"),
    (["loss-head", "--device", "cpu", "--hidden-from", "gemma3-270m", "--model", "gemma2-2b"], "give one of --model"),
    (["loss-head", "--device", "cpu", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["loss-head", "--peers", "torch"], "invalid choice"),
    (["end-to-end", "--device", "cpu", "--seq-len", "4"], "--seq-len must be at least 8"),
    (["end-to-end", "--memory-budget-mib", "-1"], "expected a positive number"),
    (["end-to-end", "--model", "gpt2"], "invalid choice"),
])
def test_bad_flags_are_rejected_with_a_reason(monkeypatch, capsys, argv, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError(f"{argv} was accepted and a benchmark started")

    monkeypatch.setattr(bench, "run_op", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_backend_that_cannot_run_on_the_device_is_rejected(capsys):
    unusable = sorted(set(fastpref.registered_backends()) - set(fastpref.available_backends("cpu")))
    if not unusable:
        pytest.skip("every registered backend runs on the CPU here")
    with pytest.raises(SystemExit):
        cli.main(["bench", "loss-head", "--device", "cpu", "--backends", unusable[0]])
    assert "cannot run on device cpu" in capsys.readouterr().err
