"""`fastpref plan --calibrate`: the peers' designs at the shapes of their published figures."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from fastpref import cli
from fastpref.bench import calibration, plan as plan_module
from fastpref.bench.calibration import (DESIGNS, FIGURES, FILTERED_FIGURES, HEADLINE, PER_TOKEN_PEERS, Figure,
                                        implied_kept_share, predicted_ms, torch_native_chunk_rows, within_tolerance,
                                        worst)
from fastpref.bench.plan import DEVICE_KINDS, Shape


DOC = Path(__file__).resolve().parents[1] / "docs" / "cost-model.md"


def nhv(shape: Shape) -> int:
    return shape.n * shape.hidden * shape.vocab


def test_every_published_figure_is_explained_within_twenty_percent():
    missed = [(f.design, f.shape.describe(), round(f.ratio, 3)) for f in FIGURES if not within_tolerance(f.ratio)]
    assert not missed


def test_the_table_recomputes_every_figure_and_ends_with_the_worst_ratio(capsys):
    assert cli.main(["plan", "--calibrate"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    bad = worst(FIGURES)
    assert lines[-1] == f"calibration: worst ratio {bad.ratio:.2f} over {len(FIGURES)} published figures"
    assert all(abs(math.log(f.ratio)) <= abs(math.log(bad.ratio)) for f in FIGURES)
    for figure in FIGURES:
        cells = (f"| {figure.design} | {DEVICE_KINDS[figure.device_kind].name} | {figure.shape.describe()} | "
                 f"{figure.published_ms:.2f} | {figure.predicted_ms():.2f} | {figure.ratio:.2f} | {figure.source} |")
        assert cells in lines
    for device in DEVICE_KINDS.values():
        assert f"- {plan_module.rates_line(device)}" in lines
    assert "model estimates" in out


def test_a_wrong_rate_shows_in_the_table(monkeypatch, capsys):
    """Halving the H100's matmul rate leaves the H100 figures unexplained, and the table says so."""
    slow = dataclasses.replace(DEVICE_KINDS["h100"], matmul_tflops=DEVICE_KINDS["h100"].matmul_tflops / 2)
    monkeypatch.setitem(DEVICE_KINDS, "h100", slow)
    missed = [f for f in FIGURES if not within_tolerance(f.ratio)]
    assert missed and all(f.device_kind == "h100" for f in missed)
    assert cli.main(["plan", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "(off)" in out
    assert out.strip().splitlines()[-1].startswith(f"calibration: worst ratio {worst(FIGURES).ratio:.2f}")


def test_figures_are_quoted_with_their_source():
    for figure in FIGURES + FILTERED_FIGURES:
        assert figure.design in DESIGNS and figure.device_kind in DEVICE_KINDS
        assert figure.published_ms > 0 and figure.source
    assert len({(f.design, f.device_kind, f.shape) for f in FIGURES}) == len(FIGURES)


@pytest.mark.parametrize("design, multiple", [
    ("liger-cute", 8), ("liger-cute forward", 2), ("liger-cute backward", 6), ("liger-cute-flce", 6), ("quack", 6),
    ("cce", 8), ("cce forward", 2), ("cce backward", 6), ("verl backward", 6), ("verl-torch", 8),
    ("cublas-gemms", 6), ("trl", 8), ("torch-native", 8)])
def test_peer_designs_count_their_flops(design, multiple):
    shape = Shape(8192, 4096, 131072)  # whole waves, chunks and tiles of every design
    assert sum(launch.flops for launch in DESIGNS[design](shape)) == pytest.approx(multiple * nhv(shape))


def test_cce_filtering_skips_products_and_adds_of_the_dropped_tiles():
    shape = calibration.GEMMA2_HEAD
    (full,), (half,) = calibration.cce_backward(shape), calibration.cce_backward(shape, 0.5)
    assert half.flops == pytest.approx(4 * nhv(shape)) and full.flops == pytest.approx(6 * nhv(shape))
    assert half.atomic_bytes == pytest.approx(full.atomic_bytes / 2)
    for figure in FILTERED_FIGURES:
        share = implied_kept_share(figure)
        assert 0 < share < 1
        at_share = predicted_ms(DESIGNS[figure.design](figure.shape, share), figure.device_kind)
        assert at_share == pytest.approx(figure.published_ms, rel=1e-6)
    unreachable = dataclasses.replace(FILTERED_FIGURES[0], published_ms=1.0)
    assert implied_kept_share(unreachable) is None


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="needs torch >= 2.13")
@pytest.mark.parametrize("n, hidden, vocab", [(16384, 4096, 131072), (4096, 4096, 128256), (1000, 2304, 256000)])
def test_torch_native_chunks_follow_pytorch(n, hidden, vocab):
    """The model's chunk is the one PyTorch picks for CUDA bf16 with default options."""
    options = torch.nn.LinearCrossEntropyOptions()._adjust(n, hidden, vocab, torch.bfloat16, torch.device("cuda"))
    assert torch_native_chunk_rows(Shape(n, hidden, vocab)) == options.batch_chunk_size


def test_persistent_design_is_predicted_ahead_of_every_per_token_peer_at_the_headline():
    persistent = plan_module.plan(HEADLINE, "trainable", "persistent", "h100").predicted_ms
    for peer in PER_TOKEN_PEERS:
        assert persistent < predicted_ms(DESIGNS[peer](HEADLINE), "h100")
    published = [f for f in FIGURES if f.design == "liger-cute" and f.shape == HEADLINE and f.device_kind == "h100"]
    assert published and persistent < published[0].published_ms


def test_figure_prediction_uses_the_figures_own_device_and_shape():
    figure = Figure("cublas-gemms", "h200", Shape(4096, 1024, 32768), 1.0, "test")
    expected = 3 * 2 * 4096 * 1024 * 32768 / (DEVICE_KINDS["h200"].matmul_tflops * 1e12) * 1e3
    assert figure.predicted_ms() == pytest.approx(expected, rel=0.01)


def test_the_documentation_quotes_the_current_calibration(capsys):
    """docs/cost-model.md quotes the command's table: every row and the last line, as printed now."""
    assert cli.main(["plan", "--calibrate"]) == 0
    doc = DOC.read_text()
    quoted = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("|", "- ", "calibration:"))]
    assert quoted and all(line in doc for line in quoted)
