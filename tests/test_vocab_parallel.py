"""A vocabulary-parallel head (a DTensor weight with Shard(0)) on 2 and 3 gloo processes gives every
process the one-process result on the gathered weight: every output, every gradient.

Each process count is one spawn running every case (starting processes costs more than the cases);
each process saves what it got, and the tests compare it with the one-process op run here.
"""
import faulthandler
import os

import pytest
import torch
import torch.multiprocessing as mp

import fastpref
from reference import reference_head_outputs
from test_distributed import _free_port, exit_without_teardown
from test_trainer import config

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _ties(hidden, weight, bias, targets, owner_rows):
    """Make row n's target tie with the largest logit of another process's slice: is_top1 then
    depends on which slice comes first (argmax takes the first maximum)."""
    for n, (target, twin) in owner_rows.items():
        weight[target] = weight[twin] = 4 * hidden[n]
        bias[target] = bias[twin] = 0
        targets[n] = target


def _inputs(case, vocab, dtype=torch.float64):
    """(hidden, weight, bias, targets, op options, loss weights) of a case, the same in every process."""
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    rows, width = 13, 6
    hidden = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64) / 2
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64) / 4
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[[2, 7]] = -100
    grads = torch.randn(2, rows, generator=generator, dtype=torch.float64)
    options = {}
    if case == "outputs":
        # a target tied with an earlier slice's maximum (not top-1), and with a later one's (top-1)
        _ties(hidden, weight, bias, targets, {0: (vocab - 1, 0), 1: (1, vocab - 2)})
        options = dict(outputs=OUTPUTS)
    elif case == "transform":
        options = dict(outputs=("log_probs", "entropy"), logit_scale=1.3, softcap=2.0, temperature=0.8)
        bias = None
    elif case == "num_kept":
        options = dict(num_kept=rows - 2)
        bias = None
    elif case == "frozen":
        options = dict(outputs=("log_probs", "is_top1"))
    elif case == "triton":  # the Triton kernels (interpreted on a CPU) under the stand-in target
        options = dict(outputs=OUTPUTS, backend="triton")
    return (hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets, options, grads)


CASES = {"outputs": (37, torch.float64), "transform": (37, torch.float64), "num_kept": (101, torch.float32),
         "frozen": (37, torch.float64), "triton": (37, torch.float32)}
# the 2-D meshes: the vocabulary over the second dimension, or over the first
MESHES_2D = {"mesh_2d": (1, None), "mesh_2d_first": (None, 1)}


def _objective(result, grads):
    """A scalar that weighs every differentiable output (the log-probs and, when asked, the entropy)."""
    if isinstance(result, torch.Tensor):
        return (result.double() * grads[0]).sum()
    total = (result.log_probs.double() * grads[0]).sum()
    if result.entropy is not None:
        total = total + (result.entropy.double() * grads[1]).sum()
    return total


def _run(case, hidden, weight, bias, targets, options, grads):
    """Every output and gradient of one call, as a dict of tensors (DTensor gradients as local shards)."""
    frozen = case == "frozen"
    hidden = hidden.clone().requires_grad_(True)
    weight.requires_grad_(not frozen)
    if bias is not None:
        bias.requires_grad_(not frozen)
    result = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, **options)
    _objective(result, grads).backward()
    found = {"log_probs": result} if isinstance(result, torch.Tensor) else \
        {name: getattr(result, name) for name in OUTPUTS if getattr(result, name) is not None}
    found["d_hidden"] = hidden.grad
    for name, value in (("d_weight", weight), ("d_bias", bias)):
        if value is not None and value.grad is not None:
            grad = value.grad
            found[name] = grad.to_local() if hasattr(grad, "to_local") else grad
            found[name + "_placements"] = str(tuple(getattr(grad, "placements", ())))
    return {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in found.items()}


def _loss_inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    vocab, width = 37, 6
    cu_seqlens = torch.tensor([0, 4, 9, 12, 17])
    response_mask = torch.ones(17, dtype=torch.bool)
    response_mask[[0, 4, 5, 9, 12, 13]] = False
    layout = fastpref.PackedLayout.paired(cu_seqlens, response_mask, torch.tensor([0, 2]), torch.tensor([1, 3]))
    hidden = torch.randn(17, width, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab, (17,), generator=generator)
    reference = torch.randn(4, generator=generator, dtype=dtype)
    return hidden, weight, targets, layout, reference


def _run_loss(hidden, weight, targets, layout, reference):
    hidden = hidden.clone().requires_grad_(True)
    weight.requires_grad_(True)
    loss, metrics = fastpref.PreferenceLoss("sigmoid", beta=0.3)(hidden, weight, targets, layout, reference)
    loss.backward()
    grad = weight.grad
    return {"loss": loss.detach(), "rewards_margin": metrics["rewards/margins"].detach(), "d_hidden": hidden.grad,
            "d_weight": grad.to_local() if hasattr(grad, "to_local") else grad}


def _errors(mesh):
    """The message of each placement the op refuses, of a target beyond the vocabulary, and of
    targets that differ between the processes."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    hidden, weight, _, targets, _, _ = _inputs("errors", 37)
    messages = {}
    for name, placements in (("shard1", [Shard(1)]), ("replicate", [Replicate()])):
        with pytest.raises(ValueError) as error:
            fastpref.linear_logprobs(hidden, distribute_tensor(weight, mesh, placements), targets)
        messages[name] = str(error.value)
    partial = DTensor.from_local(weight.clone(), mesh, [Partial()])
    with pytest.raises(ValueError) as error:
        fastpref.linear_logprobs(hidden, partial, targets)
    messages["partial"] = str(error.value)
    with pytest.raises(ValueError) as error:
        fastpref.linear_logprobs(hidden, distribute_tensor(weight, mesh, [Shard(0)]), targets,
                                 bias=torch.zeros(37, dtype=weight.dtype))
    messages["plain_bias"] = str(error.value)
    beyond = targets.clone()
    beyond[3] = 37  # one past the last slice
    with pytest.raises(ValueError) as error:
        fastpref.linear_logprobs(hidden, distribute_tensor(weight, mesh, [Shard(0)]), beyond, check=True)
    messages["target"] = str(error.value)
    differing = targets.clone()
    differing[5] = mesh.get_local_rank()  # data-parallel processes would hold different rows
    with pytest.raises(ValueError) as error:
        fastpref.linear_logprobs(hidden, distribute_tensor(weight, mesh, [Shard(0)]), differing, check=True)
    messages["differing"] = str(error.value)
    return messages


def _sliced(rank, processes):
    """Every case on a mesh of the first `processes` ranks (None on the others, which still build
    the meshes with them: a mesh's groups are created by every process)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ranks = torch.arange(processes)
    mesh = DeviceMesh("cpu", ranks)
    # one dimension of a 2-D mesh sharding the vocabulary, the other (of size 1) replicating it
    meshes_2d = {name: DeviceMesh("cpu", ranks.reshape([processes if size is None else size for size in shape]))
                 for name, shape in MESHES_2D.items()}
    if rank >= processes:
        return None
    found = {}
    for case, (vocab, dtype) in CASES.items():
        hidden, weight, bias, targets, options, grads = _inputs(case, vocab, dtype)
        found[case] = _run(case, hidden, distribute_tensor(weight, mesh, [Shard(0)]),
                           None if bias is None else distribute_tensor(bias, mesh, [Shard(0)]), targets, options, grads)
    for name, shape in MESHES_2D.items():
        placements = [Shard(0) if size is None else Replicate() for size in shape]
        hidden, weight, bias, targets, options, grads = _inputs("outputs", 37)
        found[name] = _run(name, hidden, distribute_tensor(weight, meshes_2d[name], placements),
                           distribute_tensor(bias, meshes_2d[name], placements), targets, options, grads)
    hidden, weight, targets, layout, reference = _loss_inputs()
    found["loss"] = _run_loss(hidden, distribute_tensor(weight, mesh, [Shard(0)]), targets, layout, reference)
    found["errors"] = _errors(mesh)
    return found


def _tp_plan_model(folder):
    """A transformers model loaded with tp_plan="auto": its LM head as transformers shards it, the
    op on its hidden states (V = 101: 51 and 50 rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "tp-plan-model"), tp_plan="auto",
                                                 dtype=torch.float32)
    weight = model.lm_head.weight
    hidden = model(input_ids=torch.arange(1, 12)[None], output_hidden_states=True, logits_to_keep=1)
    hidden = hidden.hidden_states[-1][0].detach().requires_grad_(True)
    targets = torch.arange(2, 13) * 7 % 101
    log_probs = fastpref.linear_logprobs(hidden, weight, targets)
    log_probs.sum().backward()
    return {"hidden": hidden.detach(), "targets": targets, "log_probs": log_probs.detach(), "d_hidden": hidden.grad,
            "placements": str(tuple(weight.placements)), "tp_size": model.tp_size}


def _worker(rank, world_size, processes, port, folder, train_options):
    """The sliced cases on `processes` of the `world_size` ranks; with four, FSDP2 x TP on all; with
    `train_options`, a transformers tp_plan model and a `--parallel tp` run on all."""
    import torch.distributed as dist

    faulthandler.dump_traceback_later(300, exit=True)  # a missed collective fails, with where
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    found = {"sliced": _sliced(rank, processes)}
    if world_size == 4:
        found["fsdp_tp"] = _fsdp_tp(rank)
    if train_options is not None:
        from fastpref.train.loop import TrainConfig, train

        found["tp_plan"] = _tp_plan_model(folder)
        found["train_losses"] = train(TrainConfig(**train_options)).losses
        # the same run stopped after its checkpoint at step 1, then run again: it resumes
        resumed = TrainConfig(**dict(train_options, output_dir=train_options["output_dir"] + "-resumed"))
        with pytest.raises(_Stopped):
            train(resumed, on_step=_stop_after_first_step)
        found["resumed_losses"] = train(resumed).losses
    torch.save(found, os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()
    exit_without_teardown()


class _Stopped(Exception):
    """Stands for a process killed after a checkpoint."""


def _stop_after_first_step(step):
    if step == 1:
        raise _Stopped


# no warmup: the first step moves the weights, so the second step's loss differs from the first
TRAIN_OPTIONS = dict(pairs_per_step=3, max_steps=2, save_steps=1, eval_steps=2, warmup_ratio=0.0)


def _spawn(folder, world_size, processes, train_options=None):
    mp.spawn(_worker, args=(world_size, processes, _free_port(), str(folder), train_options), nprocs=world_size,
             join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, small_data):
    """(what each process found, the `--parallel tp` run's folder): the trainer's run shares the
    spawn (starting processes costs more than these tiny runs)."""
    folder = tmp_path_factory.mktemp("vocab-parallel-2")
    _tiny_llama().save_pretrained(folder / "tp-plan-model")
    train_options = vars(config(folder, small_data, parallel="tp", **TRAIN_OPTIONS))
    return _spawn(folder, 2, 2, train_options), folder / "run"


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    """What each of four processes found: the three-process cases on the first three, FSDP2 x TP on all."""
    return _spawn(tmp_path_factory.mktemp("vocab-parallel-4"), 4, 3)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-processes", "3-processes"])
def sharded(request):
    """(process count, what each of them found)."""
    if request.param == 2:
        found = request.getfixturevalue("two_processes")[0]
    else:
        found = request.getfixturevalue("four_processes")[:3]
    return request.param, [process["sliced"] for process in found]


def _slices(vocab, processes):
    chunk = -(-vocab // processes)
    return [slice(min(rank * chunk, vocab), min((rank + 1) * chunk, vocab)) for rank in range(processes)]


def _compare(found, expected, rank, processes, vocab, tolerance):
    for name, value in expected.items():
        if name.endswith("_placements"):
            continue
        got = found[name]
        if name in ("d_weight", "d_bias"):
            value = value[_slices(vocab, processes)[rank]]
        if value.dtype == torch.bool:
            assert torch.equal(got, value), f"{name} differs on process {rank}"
        else:
            torch.testing.assert_close(got, value, rtol=tolerance, atol=tolerance,
                                       msg=lambda text: f"{name} on process {rank}: {text}")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES) + sorted(MESHES_2D))
def test_every_output_and_gradient_equals_one_process(sharded, case):
    processes, found = sharded
    vocab, dtype = CASES.get(case, (37, torch.float64))
    expected = _run(case, *_inputs("outputs" if case in MESHES_2D else case, vocab, dtype))
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for rank, process in enumerate(found):
        assert set(process[case]) == set(expected), case
        _compare(process[case], expected, rank, processes, vocab, tolerance)
        for name in ("d_weight", "d_bias"):
            if name in expected:
                assert "Shard(dim=0)" in process[case][name + "_placements"], process[case][name + "_placements"]


@pytest.mark.slow
def test_outputs_match_the_float64_reference_with_ties(sharded):
    """The tied targets are decided by slice order: row 0 ties an earlier slice (not top-1), row 1
    a later one (top-1)."""
    hidden, weight, bias, targets, options, _ = _inputs("outputs", 37)
    reference = reference_head_outputs(hidden, weight, targets, bias)
    assert not reference["is_top1"][0] and reference["is_top1"][1]
    for process in sharded[1]:
        for name in OUTPUTS:
            if name == "is_top1":
                assert torch.equal(process["outputs"][name], reference[name])
            else:
                torch.testing.assert_close(process["outputs"][name], reference[name], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_preference_loss_and_gradients_equal_one_process(sharded):
    processes, found = sharded
    expected = _run_loss(*_loss_inputs())
    for rank, process in enumerate(found):
        _compare(process["loss"], expected, rank, processes, 37, 1e-10)


@pytest.mark.slow
def test_unsupported_placements_and_bad_targets_are_refused_by_name(sharded):
    messages = sharded[1][0]["errors"]
    assert "Shard(dim=1)" in messages["shard1"] and "expected Shard(0)" in messages["shard1"]
    assert "replicated on every mesh dimension" in messages["replicate"]
    assert "Partial" in messages["partial"] and "expected Shard(0)" in messages["partial"]
    assert "bias must be sharded like the weight" in messages["plain_bias"]
    assert "targets must lie in [0, V = 37)" in messages["target"] and "position 3 (value 37)" in messages["target"]
    assert "hold different targets at 1 computed rows, the first at row 5" in messages["differing"]


@pytest.mark.slow
def test_trainer_with_the_head_sharded_equals_one_process(two_processes, tmp_path, small_data, monkeypatch):
    """`--parallel tp` on two processes: the losses and the trained weights of one process with the
    same global batch (the weights moved: the comparison is not of two starting points); stopped
    after its checkpoint and run again, it resumes to the same."""
    found, run = two_processes
    from transformers import AutoModelForCausalLM

    from fastpref import head_loss
    from fastpref.train.loop import train

    # the sharded head takes the two-op loss; so does the one process here, so that the comparison is
    # of the sharding alone (the one-op loss sums in another order: 1e-5 apart after the run's steps)
    monkeypatch.setattr(head_loss, "unavailable_reason", lambda *_, **__: "compared with the sharded head's path")
    single = train(config(tmp_path, small_data, **TRAIN_OPTIONS))
    for process in found:
        assert process["train_losses"] == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    assert single.losses[-1] != single.losses[0]
    models = [AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
              for path in (single.model_path, run / "final", run / "initial")]
    trained, sharded_run, initial = (dict(model.named_parameters()) for model in models)
    for name, weight in trained.items():
        assert (sharded_run[name] - weight).norm() <= 1e-5 * weight.norm(), name
    assert (trained["lm_head.weight"] - initial["lm_head.weight"]).norm() > 1e-3 * initial["lm_head.weight"].norm()
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]
    # stopped after step 1 and run again: the sharded checkpoint resumes to the uninterrupted run
    resumed = run.parent / "run-resumed"
    for process in found:
        assert process["resumed_losses"] == pytest.approx(process["train_losses"][1:], rel=1e-6, abs=1e-7)
    final = dict(AutoModelForCausalLM.from_pretrained(resumed / "final", local_files_only=True).named_parameters())
    for name, weight in sharded_run.items():
        assert (final[name] - weight).norm() <= 1e-6 * weight.norm(), name


def test_trainer_refuses_what_the_sharded_head_cannot_run():
    from fastpref.train.tensor_parallel import check_setup

    with pytest.raises(ValueError, match="--parallel tp needs a process group of 2 or more"):
        check_setup("tp", 1, 0)
    with pytest.raises(ValueError, match="--parallel tp with --lora-r 8"):
        check_setup("tp", 2, 8)
    check_setup("tp", 2, 0)


@pytest.mark.parametrize("outputs", [(), ("entropy",), OUTPUTS[1:]])
def test_the_all_gather_carries_the_statistics_the_cost_model_counts(outputs):
    """The per-row statistics one process gathers number fastpref.vocab_parallel.statistics_per_row."""
    from fastpref.backends import HeadOptions, torch_backend
    from fastpref.vocab_parallel import VocabularySlice, _statistics, statistics_per_row

    hidden, weight, _, targets, _, _ = _inputs("statistics", 37)
    targets = targets.clamp(min=0)
    options = HeadOptions(outputs=frozenset(outputs))
    result = torch_backend.forward(hidden, weight[:19], None, targets.clamp(max=18), options, False)
    piece = VocabularySlice(None, 0, 2, 0, 19, 37)
    statistics = _statistics(result, targets < 19, targets, piece, options)
    assert statistics.shape == (statistics_per_row(outputs), 13)


def test_the_trl_drop_in_refuses_a_tensor_parallel_model(tmp_path):
    """Refused before TRL reads any data, the setting named."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig

    from fastpref.integrations.trl import FastprefDPOTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model._tp_size = 2  # what from_pretrained(..., tp_plan="auto") records over two processes
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    with pytest.raises(ValueError, match=r"model.tp_size=2: tensor-parallel models are not supported"):
        FastprefDPOTrainer(model=model, args=args, train_dataset=None)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, model_init_kwargs={"tp_plan": "auto"})
    with pytest.raises(ValueError, match=r"tp_plan='auto': tensor-parallel models are not supported"):
        FastprefDPOTrainer(model="some/model", args=args, train_dataset=None)


class _HeadModule(torch.nn.Module):
    """An LM head whose forward is the op on its own weight: under FSDP2 the weight is gathered
    over the data dimension there (as the trainer's FusedHeadForward reads it), still sharded on
    the vocabulary by tensor parallelism."""

    def __init__(self, vocab, width):
        super().__init__()
        self.lm_head = torch.nn.Linear(width, vocab, dtype=torch.float64)

    def forward(self, hidden, targets):
        return fastpref.linear_logprobs(hidden, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                        outputs=("log_probs", "entropy"))


def _fsdp_tp_inputs(data_rank):
    hidden, _, _, targets, _, grads = _inputs(f"fsdp-tp-{data_rank}", 37)
    return hidden, targets, grads


def _fsdp_tp(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "vocab"))
    torch.manual_seed(0)
    model = _HeadModule(37, 6)
    parallelize_module(model, mesh["vocab"], {"lm_head": ColwiseParallel()})
    fully_shard(model, mesh=mesh["data"])
    hidden, targets, grads = _fsdp_tp_inputs(mesh.get_local_rank(0))
    hidden.requires_grad_(True)
    result = model(hidden, targets)
    _objective(result, grads).backward()
    found = {"log_probs": result.log_probs.detach(), "entropy": result.entropy.detach(), "d_hidden": hidden.grad,
             "placements": str(tuple(model.lm_head.weight.placements))}
    # the whole gradients, for the comparison only (FSDP2 averages them over the data dimension)
    found.update(d_weight=model.lm_head.weight.grad.full_tensor(), d_bias=model.lm_head.bias.grad.full_tensor())
    return found


@pytest.mark.slow
def test_fsdp2_by_tensor_parallel_on_four_processes(four_processes):
    """A 2 x 2 mesh: FSDP2 over the data dimension (each half its own batch), the head sharded on
    the vocabulary (V = 37: 19 and 18 rows) over the other. Every process gets its batch's
    one-process outputs and hidden gradient; the head's gradients are the one-process ones
    averaged over the two batches, as FSDP2 reduces them."""
    found = [process["fsdp_tp"] for process in four_processes]
    assert "Shard(dim=0)" in found[0]["placements"]
    torch.manual_seed(0)
    model = _HeadModule(37, 6)
    expected = []
    for data_rank in range(2):
        hidden, targets, grads = _fsdp_tp_inputs(data_rank)
        hidden.requires_grad_(True)
        model.zero_grad()
        result = model(hidden, targets)
        _objective(result, grads).backward()
        expected.append({"log_probs": result.log_probs.detach(), "entropy": result.entropy.detach(),
                         "d_hidden": hidden.grad, "d_weight": model.lm_head.weight.grad.clone(),
                         "d_bias": model.lm_head.bias.grad.clone()})
    for rank, process in enumerate(found):
        for name in ("log_probs", "entropy", "d_hidden"):
            torch.testing.assert_close(process[name], expected[rank // 2][name], rtol=1e-10, atol=1e-10)
        for name in ("d_weight", "d_bias"):
            torch.testing.assert_close(process[name], (expected[0][name] + expected[1][name]) / 2,
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_a_transformers_tp_plan_head_equals_one_process(two_processes):
    """from_pretrained(..., tp_plan="auto") on two processes: the LM head a DTensor with Shard(0)
    over V = 101 (51 and 50 rows); the op on it gives each process the log-probs and the hidden
    gradient of the whole head."""
    found, run = two_processes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.parent / "tp-plan-model", local_files_only=True)
    for process in (p["tp_plan"] for p in found):
        assert process["placements"] == "(Shard(dim=0),)" and process["tp_size"] == 2
        hidden = process["hidden"].clone().requires_grad_(True)
        log_probs = fastpref.linear_logprobs(hidden, model.lm_head.weight, process["targets"])
        log_probs.sum().backward()
        torch.testing.assert_close(process["log_probs"], log_probs.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(process["d_hidden"], hidden.grad, rtol=1e-5, atol=1e-5)
