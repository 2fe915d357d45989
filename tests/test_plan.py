"""The LM-head cost model: each launch's terms, the designs' counts and memory, the CLI."""
import math

import pytest

from fastpref import cli
from fastpref.backends.scratch import DEFAULT_SCRATCH_BYTES
from fastpref.bench.plan import (DEVICE_KINDS, DESIGNS, FP32, TRITON_TILE, Launch, Shape, cuda_extra_bytes, design_title,
                                 cuda_slab_width, flop_floor, frozen_blocks, groups_extra_bytes, materialized_extra_bytes,
                                 operand_intensity, persistent_extra_bytes, persistent_layout, plan, slab_extra_bytes,
                                 slab_width, wave_efficiency)

HEADLINE = Shape(16384, 4096, 128256)
# Where the targets of the persistent design are set (Llama-3's head, rounded to 2^17).
TARGET_SHAPE = Shape(16384, 4096, 131072)
H100 = DEVICE_KINDS["h100"]


def test_a_launch_takes_the_largest_of_compute_memory_and_atomics_plus_a_serialised_epilogue():
    launch = Launch("test", 1, flops=3e12, hbm_bytes=6e9, atomic_bytes=2e9, tile=(128, 256), tiles=200,
                    epilogue_logits=7e9)
    rate = min(H100.matmul_tflops, operand_intensity((128, 256), 2) * H100.l2_tb_s) * 1e12 * 200 / 264
    compute = 3e12 / rate * 1e3
    memory = 6e9 / (H100.hbm_tb_s * 1e12) * 1e3
    atomics = 2e9 / (H100.atomic_tb_s * 1e12) * 1e3
    epilogue = 7e9 / (H100.serial_epilogue_glogits_s * 1e9) * 1e3
    assert launch.predicted_ms(H100, 2) == pytest.approx(max(compute, memory, atomics) + epilogue)
    assert launch.bound(H100, 2) == max((compute, "compute"), (memory, "HBM"), (atomics, "atomics"))[1] + " + epilogue"
    # A device that hides the epilogue adds nothing for it; a cuBLAS GEMM (no tile) runs at the matmul rate.
    a100 = DEVICE_KINDS["a100"]
    assert a100.serial_epilogue_glogits_s is None
    assert launch.terms_ms(a100, 2)["epilogue"] == 0
    gemm = Launch("gemm", 1, flops=3e12, hbm_bytes=0)
    assert gemm.predicted_ms(H100, 2) == pytest.approx(3e12 / (H100.matmul_tflops * 1e12) * 1e3)


def test_operand_intensity_and_wave_efficiency():
    assert operand_intensity((128, 128), 2) == 64
    assert operand_intensity((128, 256), 2) == pytest.approx(85.33, abs=0.01)
    assert operand_intensity((128, 128), 4) == 32
    assert wave_efficiency(132, 132) == 1
    assert wave_efficiency(133, 132) == pytest.approx(133 / 264)
    assert wave_efficiency(1, 132) == pytest.approx(1 / 132)


@pytest.mark.parametrize("design", DESIGNS)
def test_every_design_does_the_flop_floor_without_atomics(design):
    """8NHV (4NHV frozen) in GEMMs, or 6NHV for the design that keeps a group's logits; never
    faster than its GEMMs at the matmul rate."""
    for head in ("trainable", "frozen"):
        result = plan(HEADLINE, head, design, "h100")
        assert all(launch.atomic_bytes == 0 for launch in result.launches)
        gemm_flops = sum(launch.flops for launch in result.launches if launch.flops > 4 * HEADLINE.n * HEADLINE.hidden)
        kept_logits = design == "groups" and head == "trainable"
        assert gemm_flops == pytest.approx(flop_floor(HEADLINE, head) * (0.75 if kept_logits else 1), rel=1e-9)
        assert result.predicted_ms >= gemm_flops / (H100.matmul_tflops * 1e12) * 1e3
        assert result.share_of_peak == pytest.approx(result.floor_ms / result.predicted_ms)


def test_groups_design_trades_memory_for_the_trainable_target():
    """The loss with its gradients in the forward on the CUDA backend: 6NHV in cuBLAS GEMMs and
    the CUDA epilogues, within 100 ms at the target shape on an H100 (ahead of the other
    designs), for the memory of a [2048, V] store and dz and a float32 weight gradient."""
    result = plan(TARGET_SHAPE, "trainable", "groups", "h100")
    assert result.predicted_ms <= 100.0
    assert result.predicted_ms < min(plan(TARGET_SHAPE, "trainable", design, "h100").predicted_ms
                                     for design in DESIGNS if design != "groups")
    assert all(launch.tile is None and not launch.epilogue_logits for launch in result.launches)
    rows, vocab, hidden = 2048, TARGET_SHAPE.vocab, TARGET_SHAPE.hidden
    assert groups_extra_bytes(TARGET_SHAPE, "trainable", DEFAULT_SCRATCH_BYTES) == (
        rows * vocab * (FP32 + 2) + 2 * rows * hidden * 2 + vocab * hidden * FP32)
    one_group = Shape(1000, 2304, 256000)
    assert groups_extra_bytes(one_group, "trainable", DEFAULT_SCRATCH_BYTES) == 1000 * 256000 * 6 + 2 * 1000 * 2304 * 2
    assert not any("rounded" in launch.name for launch in plan(one_group, "trainable", "groups", "h100").launches)
    with pytest.raises(ValueError, match="groups design is modelled for the log-probs alone"):
        plan(TARGET_SHAPE, "trainable", "groups", "h100", options=("entropy",))


def test_slab_design_fused_kernels_pay_their_tile_cap_and_serialised_epilogue():
    """The Triton forward and logit-gradient kernels are not warp-specialised: each charges N x V
    logits of serialised epilogue and runs its 128 x 128 tiles at the L2 cap."""
    result = plan(HEADLINE, "trainable", "slab", "h100")
    fused = [launch for launch in result.launches if launch.epilogue_logits]
    assert len(fused) == 2
    for launch in fused:
        assert launch.epilogue_logits == HEADLINE.n * HEADLINE.vocab and launch.tile == TRITON_TILE
        rate = min(H100.matmul_tflops, operand_intensity(TRITON_TILE, 2) * H100.l2_tb_s) * 1e12
        compute = launch.flops / (rate * wave_efficiency(launch.tiles, H100.sms)) * 1e3
        epilogue = HEADLINE.n * HEADLINE.vocab / (H100.serial_epilogue_glogits_s * 1e9) * 1e3
        assert launch.predicted_ms(H100, 2) == pytest.approx(compute + epilogue)
    # Two programs per SM in the forward: its row blocks times vocabulary splits.
    assert fused[0].tiles == 128 * (2 * 132 // 128)


def test_persistent_design_meets_the_targets_at_the_same_rates():
    """Trainable <= 100 ms and frozen <= 50 ms at N=16,384 H=4,096 V=131,072 on an H100, extra
    memory within 1% of the materialized baseline, every FLOP in overlapped GEMMs."""
    for head, target_ms in (("trainable", 100.0), ("frozen", 50.0)):
        result = plan(TARGET_SHAPE, head, "persistent", "h100")
        assert result.predicted_ms <= target_ms
        assert all(launch.tile is None and not launch.epilogue_logits for launch in result.launches)
        extra = persistent_extra_bytes(TARGET_SHAPE, head, DEFAULT_SCRATCH_BYTES)
        assert extra <= 0.01 * materialized_extra_bytes(TARGET_SHAPE)
    trainable = plan(TARGET_SHAPE, "trainable", "persistent", "h100").predicted_ms
    frozen = plan(TARGET_SHAPE, "frozen", "persistent", "h100").predicted_ms
    assert frozen < trainable < plan(TARGET_SHAPE, "trainable", "cuda", "h100").predicted_ms


def test_persistent_layout_fits_the_scratch_budget():
    for shape in (TARGET_SHAPE, Shape(1000, 2304, 256000), Shape(300, 8192, 32000), Shape(16384, 4096, 128256, 4)):
        layout = persistent_layout(shape, DEFAULT_SCRATCH_BYTES)
        e = shape.element_bytes
        assert layout.rows % 128 == 0 and layout.rows >= 128
        assert layout.forward_columns % 256 == 0 or layout.forward_columns == shape.vocab
        forward_block = layout.rows * (shape.hidden * FP32 + 2 * layout.forward_columns * e
                                       + 2 * math.ceil(layout.forward_columns / 256) * 8)
        assert forward_block <= DEFAULT_SCRATCH_BYTES or layout.forward_columns == 256
        assert 2 * shape.n * layout.backward_columns * e <= DEFAULT_SCRATCH_BYTES or layout.backward_columns == 256
        assert persistent_extra_bytes(shape, "trainable", DEFAULT_SCRATCH_BYTES) == (
            shape.n * shape.hidden * e + max(forward_block, 2 * shape.n * layout.backward_columns * e))


def test_slab_design_at_the_default_budget_stays_within_one_percent_of_the_baseline():
    """The default scratch budget keeps the extra memory of either head under 1% of what the
    materialized logits take at the headline shape (bf16)."""
    for head in ("trainable", "frozen"):
        assert slab_extra_bytes(HEADLINE, head, DEFAULT_SCRATCH_BYTES) <= 0.01 * materialized_extra_bytes(HEADLINE)


def test_frozen_blocks_fit_the_budget():
    rows, columns = frozen_blocks(HEADLINE, 64 << 20)
    assert (rows, columns) == (512, 10922)
    assert rows * 4096 * 16 + rows * columns * 6 <= 64 << 20


def test_cuda_design_runs_every_matmul_in_cublas():
    """Trainable: 94 slabs of 1,365 columns (float32 logits + bf16 dz in 128 MiB), every FLOP in a
    GEMM at the matmul rate, the compensated accumulation of d_hidden its largest memory-bound
    cost; frozen: the torch backend's slab pass, launch for launch the slab design's."""
    assert cuda_slab_width(HEADLINE, 128 << 20) == (128 << 20) // (16384 * 6)
    trainable = plan(HEADLINE, "trainable", "cuda", "h200", 128 << 20)
    assert all(launch.tile is None and not launch.epilogue_logits for launch in trainable.launches)
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
    for design in DESIGNS:
        times = {kind: plan(HEADLINE, "trainable", design, kind).predicted_ms for kind in DEVICE_KINDS}
        assert times["a100"] > times["h100"] >= times["h200"]


def test_cli_prints_every_design_and_head(capsys):
    assert cli.main(["plan", "--device-kind", "h200"]) == 0
    out = capsys.readouterr().out
    assert "not measurements" in out and "fastpref plan --calibrate" in out
    for design in DESIGNS:
        for head in ("trainable", "frozen"):
            title = design_title(design)  # a design on paper says so
            assert f"## {title} design, {head} head, H200 (model estimate)" in out
            assert f"{title} design, {head} head: extra memory" in out
    assert "## persistent (a design on paper, not built) design" in out
    assert "% of the materialized baseline" in out


def test_k_responses_per_prompt_plan_the_head_on_each_response_once(capsys):
    """K = 4, every pair among them: grouped, N tokens; one pair at a time, each response in its 3
    pairs: the head's prediction at 3N."""
    assert cli.main(["plan", "--responses-per-prompt", "4", "--tokens", "4096", "--design", "slab",
                     "--head", "frozen"]) == 0
    out = capsys.readouterr().out
    assert "## 4 responses per prompt, every pair among them (model estimate)" in out
    assert "N = 4,096 scored tokens" in out and "one by one score each response in each pair: 12,288 tokens" in out
    grouped = plan(Shape(4096, 4096, 128256), "frozen", "slab", "h100").predicted_ms
    one_by_one = plan(Shape(3 * 4096, 4096, 128256), "frozen", "slab", "h100").predicted_ms
    assert f"| slab | frozen | {grouped:,.1f} | {one_by_one:,.1f} | {one_by_one / grouped:.2f}x |" in out
    with pytest.raises(SystemExit, match="--responses-per-prompt must be >= 2"):
        cli.main(["plan", "--responses-per-prompt", "1"])


@pytest.mark.parametrize("argv, message", [(["--tokens", "0"], "--tokens must be >= 1"),
                                           (["--scratch-mib", "-1"], "--scratch-mib must be >= 1")])
def test_cli_rejects_bad_sizes(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["plan", *argv])


def test_plan_rejects_unknown_names_and_bad_shapes():
    with pytest.raises(ValueError, match="head must be one of"):
        plan(HEADLINE, "half", "slab", "h100")
    with pytest.raises(ValueError, match="device kind must be one of"):
        plan(HEADLINE, "frozen", "slab", "tpu")
    with pytest.raises(ValueError, match="design must be one of"):
        plan(HEADLINE, "frozen", "atomic", "h100")
    with pytest.raises(ValueError, match="scratch_bytes must be >= 1"):
        plan(HEADLINE, "frozen", "slab", "h100", 0)
    with pytest.raises(ValueError, match="vocab must be >= 1"):
        Shape(16, 16, 0)
    with pytest.raises(ValueError, match="element_bytes must be 2 or 4"):
        Shape(16, 16, 16, 3)


def test_head_options_cost_what_their_kernels_add():
    """Outputs and the soft cap lengthen the Triton kernels' serialised epilogues (and narrow the
    forward's tiles), cost the CUDA epilogues nothing (bound by their float32 reads), and add
    elementwise passes to the torch pass of a frozen head."""
    from fastpref.bench.plan import TRITON_WIDE_EPILOGUE_TILE, with_head_options

    for design in ("slab", "cuda"):
        for head in ("trainable", "frozen"):
            plain = plan(HEADLINE, head, design, "h100")
            assert plan(HEADLINE, head, design, "h100", options=()).predicted_ms == plain.predicted_ms
    slab = plan(HEADLINE, "trainable", "slab", "h100", options=("entropy",))
    forward = next(launch for launch in slab.launches if launch.name.startswith("forward: GEMM"))
    assert forward.tile == TRITON_WIDE_EPILOGUE_TILE
    assert slab.predicted_ms > plan(HEADLINE, "trainable", "slab", "h100").predicted_ms
    softcapped = plan(HEADLINE, "trainable", "cuda", "h100", options=("softcap", "entropy", "is_top1"))
    assert softcapped.predicted_ms == plan(HEADLINE, "trainable", "cuda", "h100").predicted_ms
    for design in ("slab", "cuda"):
        frozen = plan(HEADLINE, "frozen", design, "h100")
        assert plan(HEADLINE, "frozen", design, "h100", options=("mean_logits",)).predicted_ms > frozen.predicted_ms
        unfolded = plan(HEADLINE, "frozen", design, "h100", options=("entropy_gradient",))
        assert not any("d_weight" in launch.name for launch in unfolded.launches)
        assert any("recompute" in launch.name or "recomputed" in launch.name for launch in unfolded.launches)
    with pytest.raises(ValueError, match="head options must be among"):
        with_head_options([], "slab", HEADLINE, "trainable", ["logits"])
    with pytest.raises(ValueError, match="persistent design is modelled for the log-probs alone"):
        plan(HEADLINE, "trainable", "persistent", "h100", options=("entropy",))


def test_the_vocabulary_parallel_plan_counts_the_slice_and_each_collective(capsys):
    """K = 3 processes on H200: each streams ceil(V / 3) rows; the forward's all_gather carries F
    float32 per row (4, and 2 more for the entropy), (K - 1) of them sent per GPU; the backward's
    ring all_reduce of d_hidden sends 2 (K - 1) / K of it; each takes 10 us + bytes / 450 GB/s."""
    from fastpref.bench.plan import COLLECTIVE_LATENCY_MS, vocab_parallel_plan

    n, hidden, vocab = HEADLINE.n, HEADLINE.hidden, HEADLINE.vocab
    cost = vocab_parallel_plan(HEADLINE, 3, "trainable", "slab", "h200", options=("entropy",))
    assert cost.head.shape.vocab == 42752 == math.ceil(vocab / 3)
    assert cost.head.predicted_ms == plan(Shape(n, hidden, 42752), "trainable", "slab", "h200",
                                          options=("entropy",)).predicted_ms
    assert cost.one_process.predicted_ms == plan(HEADLINE, "trainable", "slab", "h200", options=("entropy",)).predicted_ms
    assert cost.statistics == 6 and cost.gather_bytes == 6 * n * 4 and cost.gather_sent_bytes == 2 * 6 * n * 4
    assert cost.reduce_sent_bytes == pytest.approx(4 / 3 * n * hidden * 2)
    assert COLLECTIVE_LATENCY_MS == 0.010
    assert cost.gather_ms == pytest.approx(0.010 + 2 * 6 * n * 4 / 450e9 * 1e3)
    assert cost.reduce_ms == pytest.approx(0.010 + 4 / 3 * n * hidden * 2 / 450e9 * 1e3)
    assert cost.predicted_ms == pytest.approx(cost.head.predicted_ms + cost.gather_ms + cost.reduce_ms)
    # a sharded frozen head is not folded: the trainable passes on its slice, less d_weight
    frozen = vocab_parallel_plan(HEADLINE, 3, "frozen", "cuda", "h100")
    trainable = vocab_parallel_plan(HEADLINE, 3, "trainable", "cuda", "h100")
    assert [launch.name for launch in frozen.head.launches] == \
        [launch.name for launch in trainable.head.launches if "d_weight" not in launch.name]
    with pytest.raises(ValueError, match="tensor-parallel processes must be in"):
        vocab_parallel_plan(HEADLINE, 1, "trainable", "slab", "h100")
    with pytest.raises(ValueError, match="the sharded head runs the backends' designs"):
        vocab_parallel_plan(HEADLINE, 2, "trainable", "persistent", "h100")

    assert cli.main(["plan", "--tensor-parallel", "3", "--device-kind", "h200", "--design", "slab"]) == 0
    out = capsys.readouterr().out
    assert "over 3 processes, NVLink 450 GB/s" in out and "V / 3 = 42,752 rows" in out
    plain = vocab_parallel_plan(HEADLINE, 3, "trainable", "slab", "h200")
    assert f"| slab | trainable | {plain.one_process.predicted_ms:,.1f} | {plain.head.predicted_ms:,.2f} |" in out
