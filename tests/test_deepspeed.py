"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, as TRL's users launch DPO: ``FastprefDPOTrainer``
and ``trl.DPOTrainer`` built under ``use_fastpref_head()`` take a step on 2 gloo processes (one
pair each) equal to TRL's one-process step on both pairs, with and without LoRA; under ZeRO-3 the
LM-head weight is partitioned outside the calls of its module (fastpref's head gathers it through
one, :func:`fastpref.causal_lm.call_through_head`) and its gradient is the global batch's.

DeepSpeed runs on the CPU (its CPU accelerator, gloo). accelerate 1.16 alone does not: it picks
DeepSpeed only for a process that is not ``cpu=True`` and finds no distributed backend for such a
process without a GPU (``PartialState._prepare_backend`` returns none, so the state says one
process while DeepSpeed sees two, and DeepSpeed's batch-size check fails: "train_batch_size is
not equal to micro_batch_per_gpu * gradient_acc_step * world_size 1 != 1 * 1 * 2"). The workers
give such a process gloo, what accelerate gives a CPU process; on GPUs it picks nccl itself.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")

import peft  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM, TrainerCallback  # noqa: E402

from fastpref.integrations.trl import FastprefDPOTrainer, use_fastpref_head  # noqa: E402
from fastpref.train.default_assets import default_tokenizer  # noqa: E402
from test_distributed import _free_port, exit_without_teardown  # noqa: E402
from test_trl_integration import PAIRS, _llama_config, _lora, _perturb, _seeded  # noqa: E402


STAGES = (2, 3)
TRAINERS = ("FastprefDPOTrainer", "DPOTrainer-fastpref-head")
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "several-processes.md"


def _documented(language: str) -> str:
    """The first `language` code block of the guide's DeepSpeed section."""
    section = GUIDE.read_text().split("## DeepSpeed", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def _models(tokenizer, lora: bool):
    """(policy, ref_model): without LoRA a second model is the reference (under ZeRO-3 a DeepSpeed
    engine of its own); with LoRA a PeftModel whose trained adapter TRL copies into a frozen "ref"
    adapter, the reference, in the same engine."""
    policy = _seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer)), 0)
    if not lora:
        return policy, _seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer)), 1)
    policy = _seeded(lambda: peft.get_peft_model(policy, _lora()), 2)
    _perturb(policy)
    return policy, None


class _Gradients(TrainerCallback):
    """One process: every trainable parameter's gradient just before the optimizer step."""

    def __init__(self):
        self.gradients = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def _step(trainer_class, tokenizer, output_dir, lora: bool, batch_size: int, deepspeed=None, callbacks=()):
    """One training step of 2 pairs (batch_size per process) of a trainer of TRAINERS, or of TRL's
    own ("DPOTrainer"): (logged loss, trainer)."""
    policy, reference = _models(tokenizer, lora)
    args = trl.DPOConfig(output_dir=str(output_dir), report_to="none", bf16=False, use_cpu=deepspeed is None,
                         per_device_train_batch_size=batch_size, max_length=32, max_steps=1, logging_steps=1,
                         learning_rate=0.0, max_grad_norm=0.0, save_strategy="no", seed=0, deepspeed=deepspeed)
    build = dict(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS).select(range(2)),
                 processing_class=tokenizer, callbacks=list(callbacks))
    if trainer_class == "FastprefDPOTrainer":
        trainer = FastprefDPOTrainer(**build)
    elif trainer_class == "DPOTrainer-fastpref-head":
        with use_fastpref_head():
            trainer = trl.DPOTrainer(**build)
    else:
        trainer = trl.DPOTrainer(**build)
    trainer.train()
    return trainer.state.log_history[0]["loss"], trainer


def _read_gradients_before_deepspeed_steps(gradients: dict) -> None:
    """Fill `gradients` with every trainable parameter's whole gradient, put together from the
    partitions (deepspeed.utils.safe_get_full_grad), just before each DeepSpeed optimizer step:
    accelerate runs the engine's step inside ``backward``, before any Trainer callback."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    step = DeepSpeedEngine.step

    def step_after_reading_gradients(engine, *args, **kwargs):
        gradients.clear()
        gradients.update({name: safe_get_full_grad(param).clone()
                          for name, param in engine.module.named_parameters() if param.requires_grad})
        return step(engine, *args, **kwargs)

    DeepSpeedEngine.step = step_after_reading_gradients


def _worker(rank, port, output_dir, report):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import accelerate.state
    from accelerate.utils import DistributedType

    # See the module docstring: the one piece accelerate lacks for DeepSpeed on a CPU-only machine.
    accelerate.state.PartialState._prepare_backend = (
        lambda self, cpu=False, sagemaker_dp=False, backend=None: ("gloo", DistributedType.MULTI_CPU))
    gradients = {}
    _read_gradients_before_deepspeed_steps(gradients)
    tokenizer = default_tokenizer()
    result = {}
    for stage in STAGES:
        # the guide's config; persistence threshold 0: ZeRO-3 keeps a parameter under 1e5 elements
        # whole by default (every one of these)
        config = json.loads(_documented("json"))
        config["zero_optimization"].update(stage=stage, stage3_param_persistence_threshold=0)
        for lora in (False, True):
            for trainer_class in TRAINERS:
                loss, trainer = _step(trainer_class, tokenizer, output_dir, lora, 1, deepspeed=config)
                head = trainer.accelerator.unwrap_model(trainer.model)
                head = (head.get_base_model() if lora else head).lm_head.weight
                key = f"zero{stage}-{'lora' if lora else 'full'}-{trainer_class}"
                result[key] = {"loss": loss, "gradients": {name: g.tolist() for name, g in gradients.items()},
                               "distributed_type": str(trainer.accelerator.distributed_type),
                               "head_numel_outside_calls": head.numel(), "head_numel": head.ds_numel
                               if hasattr(head, "ds_numel") else head.numel()}
    if rank == 0:
        with open(report, "w") as handle:
            json.dump(result, handle)
    torch.distributed.barrier()
    exit_without_teardown()


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("deepspeed")
    report = output_dir / "report.json"
    mp.spawn(_worker, args=(_free_port(), output_dir, str(report)), nprocs=2, join=True)
    return json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("trainer_class", TRAINERS)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: f"zero{stage}")
def test_two_processes_equal_one_process(tmp_path, two_process_steps, stage, lora, trainer_class):
    """Loss (1e-5) and every trainable parameter's gradient (1e-4 of its norm) equal TRL's
    one-process step on the same 2 pairs; under ZeRO-3 the head weight is partitioned (empty
    outside its module's calls), and its gradient (full fine-tuning) is the global batch's."""
    step = two_process_steps[f"zero{stage}-{'lora' if lora else 'full'}-{trainer_class}"]
    assert step["distributed_type"] == "DistributedType.DEEPSPEED"
    if stage == 3:
        assert step["head_numel_outside_calls"] == 0 and step["head_numel"] > 0
    one_process = _Gradients()
    loss, _ = _step("DPOTrainer", default_tokenizer(), tmp_path, lora, 2, callbacks=[one_process])
    expected = one_process.gradients
    assert step["loss"] == pytest.approx(loss, rel=1e-5)
    assert set(step["gradients"]) == set(expected)
    assert ("lm_head.weight" in expected) == (not lora)  # LoRA: the frozen head has no gradient
    for name, gradient in expected.items():
        difference = (torch.tensor(step["gradients"][name]) - gradient).norm()
        assert difference <= 1e-4 * gradient.norm(), (name, difference.item(), gradient.norm().item())


def test_the_guides_accelerate_config_is_deepspeed_zero3(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    path = tmp_path / "zero3.yaml"
    path.write_text(_documented("yaml"))
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config["zero_stage"] == 3 and config.mixed_precision == "bf16"
