"""FSDP2 (`--parallel fsdp`) on two gloo processes trains like one process with the same global batch.

The two-process runs of a test share one spawn (starting processes costs more than these tiny runs).
"""
import contextlib
import faulthandler
import io
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from fastpref.train.default_assets import default_model, default_tokenizer
from fastpref.train.fsdp import decoder_layers
from fastpref.train.checkpoint import CheckpointError
from fastpref.train.loop import TrainConfig, TrainingInterrupted, train
from test_distributed import _free_port, exit_without_teardown
from test_trainer import config


class Killed(Exception):
    """Stands for a process killed after a checkpoint: nothing after it is saved."""


def _stop_at(step, exception):
    def on_step(current):
        if current == step:
            raise exception

    return on_step


def _worker(rank, port, runs, report):
    """Each run: (name, TrainConfig fields, None or the step after which it is killed or
    interrupted (Ctrl-C) and then resumed). Rank 0 writes every run's losses and what each rank
    printed."""
    import torch.distributed as dist

    faulthandler.dump_traceback_later(600, exit=True)  # a hang (a missed collective) fails, with where
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    losses, printed = {}, {}
    for name, options, stop_at in runs:
        if name.endswith("-killed"):
            with pytest.raises(Killed):
                train(TrainConfig(**options), on_step=_stop_at(stop_at, Killed))
        elif name.endswith("-interrupted"):
            # nothing saved on an interrupt under FSDP2: the message points to the latest checkpoint
            with pytest.raises(TrainingInterrupted, match=rf"nothing is saved .* the latest checkpoint is "
                                                          rf".*checkpoint-{stop_at}"):
                train(TrainConfig(**options), on_step=_stop_at(stop_at, KeyboardInterrupt))
        with contextlib.redirect_stdout(io.StringIO()) as out:
            losses[name] = train(TrainConfig(**options)).losses
        printed[name] = out.getvalue()
    every_rank = [None, None]
    dist.all_gather_object(every_rank, printed)
    if rank == 0:
        with open(report, "w") as handle:
            json.dump({"losses": losses, "printed": every_rank}, handle)
    dist.barrier()
    exit_without_teardown()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """12 pairs of the bundled sample: 10 to train on, 2 to evaluate."""
    from fastpref.train import data as data_module

    rows = data_module.load_rows(None).select(range(12)).to_list()
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """The embedded tiny Llama with its LM head tied to the input embeddings, saved as a local model."""
    tokenizer = default_tokenizer()
    model = default_model(tokenizer, seed=3)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tied")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


COMMON = dict(pairs_per_step=4, gradient_accumulation_steps=2, max_steps=3, eval_steps=100, eval_fraction=0.15, save_steps=2)
CASES = {
    "untied-full": dict(COMMON),
    "tied-full-online-checkpointing": dict(COMMON, precompute_ref_log_probs=False, gradient_checkpointing=True),
    "untied-lora-online": dict(COMMON, lora_r=4, precompute_ref_log_probs=False),
    "tied-lora": dict(COMMON, lora_r=4),
    # KTO's KL reference point adds a no-grad forward of the sharded policy and a sum over processes
    "untied-kto": dict(COMMON, loss_type="kto"),
}
# stopped after step 2 (checkpoint-2 saved), then resumed
STOPPED = {"untied-full": "killed", "tied-lora": "interrupted"}


def _config(root, case, data, tied_model, **extra):
    options = CASES[case]
    if case.startswith("tied"):
        options = dict(options, model=tied_model, learning_rate=3e-3)
    return config(root, data, **options, **extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tied_model):
    """Every case in one process, and on two processes (one spawn for all, killed ones too).
    Returns the root directory, the losses of one process and of two by case (a killed run's after
    its resumption under "<case>-killed" or "<case>-interrupted"), and what the runs printed (by case; two processes: by
    rank, then case)."""
    root = tmp_path_factory.mktemp("runs")
    single, printed = {}, {}
    for case in CASES:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            single[case] = train(_config(root / "one" / case, case, tiny_data, tied_model)).losses
        printed[case] = out.getvalue()
    plan = [(case, vars(_config(root / "two" / case, case, tiny_data, tied_model, parallel="fsdp")), None)
            for case in CASES]
    plan += [(f"{case}-{how}", vars(_config(root / "two" / f"{case}-{how}", case, tiny_data, tied_model,
                                            parallel="fsdp")), 2) for case, how in STOPPED.items()]
    plan += [("untied-full-bfloat16", vars(_config(root / "two" / "untied-full-bfloat16", "untied-full", tiny_data,
                                                   tied_model, parallel="fsdp", dtype="bfloat16")), None)]
    report = root / "report.json"
    mp.spawn(_worker, args=(_free_port(), plan, str(report)), nprocs=2, join=True)
    two = json.loads(report.read_text())
    return root, single, two["losses"], {"one": printed, "two": two["printed"]}


def _assert_same_weights(one, two):
    # Adam divides by the gradient's running size, so near-zero gradients (rare tokens' rows) turn
    # last-bit differences of the reductions into visible ones: compare norms, as for DDP.
    a, b = (AutoModelForCausalLM.from_pretrained(path, local_files_only=True) for path in (one, two))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert (x - y).norm() <= 1e-4 * x.norm(), name


def _final(root, *parts):
    return root.joinpath(*parts, "run", "final")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_equals_one_process(runs, case):
    """Same global batch (split over the processes), gradient accumulation: the losses and the final
    weights (saved by rank 0 as a plain model, read back by AutoModelForCausalLM) of one process."""
    root, single, two, _ = runs
    assert two[case] == pytest.approx(single[case], rel=1e-5, abs=1e-6)
    _assert_same_weights(_final(root, "one", case), _final(root, "two", case))


@pytest.mark.slow
@pytest.mark.parametrize("case, how", list(STOPPED.items()))
def test_stopped_and_resumed_equals_uninterrupted(runs, case, how):
    """Killed, or interrupted (Ctrl-C), after step 2 and run again: it resumes from checkpoint-2 and
    trains step 3 as the uninterrupted run did."""
    root, single, two, _ = runs
    run = root / "two" / f"{case}-{how}" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert two[f"{case}-{how}"] == pytest.approx(two[case][2:], rel=1e-6, abs=1e-7)
    _assert_same_weights(_final(root, "one", case), run / "final")
    if case.endswith("lora"):
        assert (run / "final-adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_on_float32_weights(runs):
    """MixedPrecisionPolicy: bf16 forward and backward (the losses move off float32's, a little),
    float32 weights for the optimizer (the final model is saved from them)."""
    root, single, two, _ = runs
    losses = two["untied-full-bfloat16"]
    assert losses == pytest.approx(single["untied-full"], abs=1e-2)
    assert max(abs(a - b) for a, b in zip(losses, single["untied-full"])) > 1e-5
    model = AutoModelForCausalLM.from_pretrained(_final(root, "two", "untied-full-bfloat16"), dtype="auto",
                                                 local_files_only=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(runs, tiny_data, tied_model, tmp_path):
    """Another world size: torch.distributed.checkpoint reshards the two processes' checkpoint."""
    root, single, _, _ = runs
    checkpoint = root / "two" / "untied-full-killed" / "run" / "checkpoint-2"
    resumed = train(_config(tmp_path, "untied-full", tiny_data, tied_model, resume_from_checkpoint=str(checkpoint)))
    assert resumed.losses == pytest.approx(single["untied-full"][2:], rel=1e-5, abs=1e-6)
    _assert_same_weights(_final(root, "one", "untied-full"), resumed.model_path)


@pytest.mark.slow
def test_corrupt_sharded_checkpoint_is_refused(runs, tiny_data, tied_model, tmp_path):
    root, _, _, _ = runs
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(root / "two" / "untied-full-killed" / "run" / "checkpoint-2", checkpoint)
    shard = sorted((checkpoint / "model-optimizer").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"corrupt: model-optimizer/{shard.name} does not match its checksum"):
        train(_config(tmp_path, "untied-full", tiny_data, tied_model, resume_from_checkpoint=str(checkpoint)))
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json: the checkpoint is incomplete"):
        train(_config(tmp_path, "untied-full", tiny_data, tied_model, resume_from_checkpoint=str(checkpoint)))


def _memory_lines(text):
    return {line.split("memory: ")[1].split(" ")[0]: line for line in text.splitlines() if " memory: " in line}


@pytest.mark.slow
def test_memory_report_at_start(runs):
    """Every process prints its own memory items; under FSDP2 it holds half of each state."""
    _, _, _, printed = runs
    items = ("parameters", "gradients", "optimizer", "reference:", "activations", "loss", "peak")
    one = _memory_lines(printed["one"]["untied-full"])
    assert set(one) == set(items)
    for rank in (0, 1):
        two = _memory_lines(printed["two"][rank]["untied-full"])
        assert set(two) == set(items) and all(line.startswith(f"[rank {rank}]") for line in two.values())
        assert "1/2 shards" in two["parameters"] and "decoder layer" in two["parameters"]
        for item in ("parameters", "gradients", "optimizer"):
            size = float(two[item].split(" MiB")[0].split(" ")[-1])
            assert size == pytest.approx(float(one[item].split(" MiB")[0].split(" ")[-1]) / 2, rel=0.05), item
        assert "the data's 2 longest pairs" in two["activations"]
        assert "the data's 4 longest pairs" in one["activations"]


def test_fsdp_without_a_process_group_fails_at_start(tmp_path, tiny_data, monkeypatch, capsys):
    from fastpref.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--parallel", "fsdp", "--data", tiny_data, "--output-dir", str(tmp_path)]) == 2
    assert "--parallel fsdp needs a process group of 2 or more processes (WORLD_SIZE is 1)" in capsys.readouterr().err


def test_world_size_not_dividing_the_batch_fails_at_start(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is joined
    with pytest.raises(ValueError, match="--pairs-per-step 3 is not a multiple of the world size 2"):
        train(config(tmp_path, tiny_data, parallel="fsdp", pairs_per_step=3))


@pytest.mark.parametrize("layer_classes, message", [
    (None, "names no decoder-layer class"),
    (["LlamaModel"], "holds the LM head or the input embeddings"),
])
def test_unsupported_models_are_refused(layer_classes, message):
    model = default_model(default_tokenizer())
    model._no_split_modules = layer_classes  # the decoder-layer classes transformers lists
    with pytest.raises(ValueError, match=f"--parallel fsdp: LlamaForCausalLM.*{message}"):
        decoder_layers(model)
