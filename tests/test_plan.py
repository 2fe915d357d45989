"""The LM-head cost model: it reproduces the hand estimate of the atomic design and counts the slab design."""
import pytest

from fastpref import cli
from fastpref.backends.scratch import DEFAULT_SCRATCH_BYTES
from fastpref.bench.plan import (DEVICE_KINDS, Shape, cuda_extra_bytes, cuda_slab_width, flop_floor, frozen_blocks,
                                 materialized_extra_bytes, operand_intensity, plan, slab_extra_bytes, slab_width)

HEADLINE = Shape(16384, 4096, 128256)


def test_atomic_design_reproduces_the_hand_estimate():
    """256 x 1,002 programs of 64 x 128 tiles (43 FLOP/B), 2.0e11 float32 atomic adds (807 GB):
    a trainable forward+backward of 300-520 ms on an H100, 17-29% of the bf16 matmul peak."""
    trainable = plan(HEADLINE, "trainable", "atomic", "h100")
    backward = trainable.launches[1]
    assert backward.count == 256 * 1002
    assert operand_intensity((64, 128), 2) == pytest.approx(42.7, abs=0.1)
    assert backward.atomic_bytes / 4 == pytest.approx(2.0e11, rel=0.01)
    assert backward.atomic_bytes / 1e9 == pytest.approx(807, rel=0.01)
    fast, slow = trainable.predicted_ms
    assert fast == pytest.approx(300, rel=0.03) and slow == pytest.approx(520, rel=0.03)
    share_fast, share_slow = trainable.share_of_peak
    assert share_fast == pytest.approx(0.29, abs=0.01) and share_slow == pytest.approx(0.17, abs=0.01)
    assert sum(launch.flops for launch in trainable.launches) == flop_floor(HEADLINE, "trainable")

    frozen = plan(HEADLINE, "frozen", "atomic", "h100")
    assert sum(launch.flops for launch in frozen.launches) == 6 * 16384 * 4096 * 128256  # recomputes z: 6NHV
    fast, slow = frozen.predicted_ms
    assert 140 < fast < slow < 280


def test_slab_design_has_no_atomics_and_does_the_floor():
    for head, floor in (("trainable", 8), ("frozen", 4)):
        result = plan(HEADLINE, head, "slab", "h100")
        assert all(launch.atomic_bytes == 0 for launch in result.launches)
        flops = sum(launch.flops for launch in result.launches)
        assert flops == pytest.approx(floor * 16384 * 4096 * 128256, rel=1e-4)  # plus d_hidden = g u
        assert max(result.share_of_peak) >= 0.6
    assert min(plan(HEADLINE, "frozen", "slab", "h100").share_of_peak) >= 0.6


def test_slab_design_at_the_default_budget_stays_within_one_percent_of_the_baseline():
    """The default scratch budget keeps the extra memory of either head under 1% of what the
    materialized logits take at the headline shape (bf16)."""
    for head in ("trainable", "frozen"):
        assert slab_extra_bytes(HEADLINE, head, DEFAULT_SCRATCH_BYTES) <= 0.01 * materialized_extra_bytes(HEADLINE)


def test_frozen_blocks_fit_the_budget():
    rows, columns = frozen_blocks(HEADLINE, 64 << 20)
    assert (rows, columns) == (512, 10922)
    assert rows * 4096 * 16 + rows * columns * 6 <= 64 << 20


def test_cuda_design_runs_the_floor_in_cublas_gemms_without_atomics():
    """Trainable: 94 slabs of 1,365 columns (float32 logits + bf16 dz in 128 MiB), every FLOP in a
    GEMM, the compensated accumulation of d_hidden its largest memory-bound cost; frozen: the torch
    backend's slab pass, launch for launch the slab design's."""
    assert cuda_slab_width(HEADLINE, 128 << 20) == (128 << 20) // (16384 * 6)
    trainable = plan(HEADLINE, "trainable", "cuda", "h200", 128 << 20)
    assert all(launch.atomic_bytes == 0 for launch in trainable.launches)
    assert sum(launch.flops for launch in trainable.launches) == flop_floor(HEADLINE, "trainable")
    assert min(trainable.share_of_peak) >= 0.6
    epilogues = [launch for launch in trainable.launches if launch.flops == 0]
    accumulate = max(epilogues, key=lambda launch: launch.hbm_bytes)
    assert "compensated" in accumulate.name and accumulate.count == 94 * 4
    assert plan(HEADLINE, "frozen", "cuda", "h200").launches == plan(HEADLINE, "frozen", "slab", "h200").launches
    float32 = plan(Shape(16384, 4096, 128256, element_bytes=4), "trainable", "cuda", "h200")
    assert not any("compensated" in launch.name for launch in float32.launches)


def test_cuda_design_memory_is_its_scratch_and_the_bf16_compensation():
    budget = 64 << 20
    width = cuda_slab_width(HEADLINE, budget)
    assert cuda_extra_bytes(HEADLINE, "trainable", budget) == 16384 * width * 6 + 16384 * 4096 * 2
    assert cuda_extra_bytes(HEADLINE, "trainable", budget) <= 0.01 * materialized_extra_bytes(HEADLINE)
    assert cuda_extra_bytes(Shape(16384, 4096, 128256, 4), "trainable", budget) == budget  # 512 columns, no lo


def test_slab_width_follows_the_scratch_budget():
    assert slab_width(HEADLINE, 128 << 20) == 4096  # 16,384 rows x 4,096 bf16 columns = 128 MiB
    assert slab_width(HEADLINE, 100 << 20) == 3200 // 128 * 128
    assert slab_width(HEADLINE, 1) == 128
    assert slab_width(Shape(8, 16, 300), 1 << 30) == 300
    for head in ("trainable", "frozen"):
        assert slab_extra_bytes(HEADLINE, head, 32 << 20) < slab_extra_bytes(HEADLINE, head, 128 << 20)


def test_every_device_kind_is_slower_where_its_rates_are_lower():
    times = {kind: plan(HEADLINE, "trainable", "slab", kind).predicted_ms[1] for kind in DEVICE_KINDS}
    assert times["a100"] > times["h100"] >= times["h200"]


def test_cli_prints_every_design_and_head(capsys):
    assert cli.main(["plan", "--device-kind", "h200"]) == 0
    out = capsys.readouterr().out
    assert "not measurements" in out
    for design in ("atomic", "slab", "cuda"):
        for head in ("trainable", "frozen"):
            assert f"## {design} design, {head} head, H200 (model estimate)" in out
    assert "slab design, frozen head: extra memory" in out and "% of the materialized baseline" in out


@pytest.mark.parametrize("argv, message", [(["--tokens", "0"], "--tokens must be >= 1"),
                                           (["--scratch-mib", "-1"], "--scratch-mib must be >= 1")])
def test_cli_rejects_bad_sizes(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["plan", *argv])


def test_plan_rejects_unknown_names():
    with pytest.raises(ValueError, match="head must be one of"):
        plan(HEADLINE, "half", "slab", "h100")
    with pytest.raises(ValueError, match="device kind must be one of"):
        plan(HEADLINE, "frozen", "slab", "tpu")
    with pytest.raises(ValueError, match="design must be one of"):
        plan(HEADLINE, "frozen", "tiled", "h100")
