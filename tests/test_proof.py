"""The GPU proof run's plumbing, on the CPU: its dry run end to end, its time limits and budget."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastpref.bench import proof
from fastpref.bench.calibration import DESIGNS, predicted_ms
from fastpref.bench.plan import Shape, plan
from tiers import first_fast

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_goes_end_to_end(tmp_path):
    results = tmp_path / "results"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHON"] = sys.executable
    run = subprocess.run(["bash", "benchmarks/gpu_proof.sh", "--dry-run", "--results-dir", str(results)],
                         cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "dry run, not run: " in run.stdout and "pip install" in run.stdout  # the install is shown, not run
    report = (results / "proof.md").read_text()
    for step in ("gpu-tests", "device-peaks", "logprobs", "loss-head", "end-to-end"):
        assert f"| {step} | ok |" in report
        assert (results / f"{step}.log").exists()
    for name in ("device-peaks", "logprobs", "loss-head", "end-to-end"):
        assert json.loads((results / f"{name}.json").read_text())
    peaks = json.loads((results / "device-peaks.json").read_text())
    assert peaks["matmul_tflops"] > 0 and peaks["copy_tb_per_s"] > 0
    assert "| logprobs | fastpref-torch | trainable | ok |" in report
    assert "| loss-head | fastpref-torch | frozen | ok |" in report
    assert "passed" in (results / "gpu-tests.log").read_text() or "skipped" in (results / "gpu-tests.log").read_text()


@pytest.mark.parametrize("launched", first_fast(["foreground", "background"]))
def test_a_step_past_its_limit_is_interrupted_and_keeps_what_it_wrote(tmp_path, launched):
    """In the background (a shell's `&` job) SIGINT arrives ignored; the step still gets it."""
    written = tmp_path / "rows.json"
    script = ("import json, time\n"
              "try:\n"
              "    time.sleep(60)\n"
              "except KeyboardInterrupt:\n"
              f"    open({str(written)!r}, 'w').write(json.dumps(['row measured before the limit']))\n"
              "    raise SystemExit(130)\n")
    step = proof.Step("slow", 1, [sys.executable, "-c", script])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if launched == "background" else signal.default_int_handler)
    try:
        proof.run_step(step, 1.0, tmp_path / "slow.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert step.status.startswith("cut at its 1 s limit")
    assert json.loads(written.read_text()) == ["row measured before the limit"]
    assert step.wall_s < 30


def test_a_failing_step_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def steps(results):
        return [proof.Step("broken", 30, [sys.executable, "-c", "raise SystemExit('no kernel image')"]),
                proof.Step("fine", 30, [sys.executable, "-c", "print('measured')"])]

    monkeypatch.setattr(proof, "dry_run_steps", steps)
    assert proof.main(["--dry-run", "--results-dir", str(tmp_path)]) == 1
    report = (tmp_path / "proof.md").read_text()
    assert "| broken | failed (exit 1) |" in report and "| fine | ok |" in report
    assert "no kernel image" in capsys.readouterr().out  # the failing step's log tail is shown


def test_steps_beyond_the_budget_are_skipped(tmp_path):
    assert proof.main(["--dry-run", "--results-dir", str(tmp_path), "--budget-s", "10"]) == 1
    report = (tmp_path / "proof.md").read_text()
    assert report.count("skipped: the run's time budget is spent") == 5


def test_unknown_step_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        proof.main(["--dry-run", "--results-dir", str(tmp_path), "--steps", "logprobs", "warp-drive"])
    assert "--steps: unknown warp-drive; the steps are gpu-tests, device-peaks" in capsys.readouterr().err


def test_gpu_steps_measure_the_headline_shape(tmp_path):
    steps = {step.name: " ".join(step.command) for step in proof.gpu_steps(tmp_path)}
    assert list(steps) == ["gpu-tests", "device-peaks", "logprobs", "loss-head", "end-to-end"]
    assert "--n 16384 --hidden 4096 --vocab 128256 --dtype bfloat16" in steps["logprobs"]
    assert "--hidden 4096 --vocab 128256 --tokens 16384" in steps["loss-head"]
    assert "-m gpu" in steps["gpu-tests"] and "--continue-on-collection-errors" in steps["gpu-tests"]
    assert sum(step.limit_s for step in proof.gpu_steps(tmp_path)[:4]) <= 540 - 60  # room for the install


def test_headline_rows_put_the_cost_model_beside_the_rows_whose_design_it_counts(tmp_path):
    row = dict(method="fastpref-triton", head="trainable", status="ok", time_ms=410.0, tflops=168.0, peak_mib=900.0,
               n=16384, scored=15000, hidden=4096, vocab=128256, dtype="bfloat16")
    cuda = dict(row, method="fastpref-cuda", head="frozen")
    materialized = dict(row, method="materialized", tflops=300.0)
    liger = dict(row, method="liger-cute")
    liger_frozen = dict(liger, head="frozen")
    absent = dict(row, method="quack", status="n/a (quack-kernels not installed)", time_ms=None, tflops=None)
    (tmp_path / "logprobs.json").write_text(json.dumps({"machine": {}, "rows": [row, cuda, materialized, liger,
                                                                                liger_frozen, absent]}))
    assert proof.device_kind("NVIDIA H100 80GB HBM3 (driver 580.159.04)") == "h100"
    assert proof.device_kind("AMD EPYC (2 torch threads)") is None
    cells = proof.headline_rows(tmp_path, peak_tflops=790.0, kind="h100")
    shape = Shape(15000, 4096, 128256)
    for measured, head, design in ((cells[0], "trainable", "slab"), (cells[1], "frozen", "cuda")):
        assert measured[2:6] == [head, "ok", "410.0", f"{plan(shape, head, design, 'h100').predicted_ms:.0f}"]
    assert cells[0][7] == "21%"
    assert cells[2][5] == "-"  # the materialized logits: no design in the model
    assert cells[3][5] == f"{predicted_ms(DESIGNS['liger-cute'](shape), 'h100'):.0f}"
    assert cells[4][5] == "-"  # a peer's frozen head: no published design to count
    assert cells[5][3:7] == ["n/a (quack-kernels not installed)", "-", "-", "-"]
    assert proof.headline_rows(tmp_path, peak_tflops=790.0, kind=None)[0][5] == "-"
