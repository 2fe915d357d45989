"""fastpref as TRL's fused LM head: `add_fused_lm_head` against TRL 1.16's own, op by op and one
step of each TRL trainer that uses it (DPO, KTO, GRPO, RLOO), and under FSDP2 on two gloo
processes against one process.

Tiny random models (hidden 32, 2 layers) on the offline tokenizer, float32 on the CPU.
"""
import contextlib
import copy
import inspect
import os
import types

import pytest
import torch
import torch.multiprocessing as mp

import peft
import trl
import trl.trainer.utils as trl_utils
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from fastpref.integrations.trl import add_fused_lm_head, use_fastpref_head
from fastpref.integrations.trl_head import TRAINER_MODULES
from fastpref.train.default_assets import default_tokenizer
from test_distributed import _free_port, exit_without_teardown
from test_trl_integration import _one_thread, tokenizer  # noqa: F401 (fixtures)

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FIELDS = ALL_OUTPUTS + ("loss", "label_mask")


def _seeded(build, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _common(vocab_size, pad_token_id):
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id, tie_word_embeddings=False)


def llama(vocab_size=97, pad_token_id=0, **options):
    return LlamaForCausalLM(LlamaConfig(**{**_common(vocab_size, pad_token_id), **options}))


def gemma2(vocab_size=97, pad_token_id=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a cap small enough to bend a tiny random model's logits
    return Gemma2ForCausalLM(Gemma2Config(**_common(vocab_size, pad_token_id), head_dim=8,
                                          final_logit_softcapping=0.6))


def granite(vocab_size=97, pad_token_id=0):
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**_common(vocab_size, pad_token_id), logits_scaling=0.25))


def mixtral(vocab_size=97, pad_token_id=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_common(vocab_size, pad_token_id), num_local_experts=4,
                                            num_experts_per_tok=2, output_router_logits=True,
                                            router_aux_loss_coef=0.05))


def _patched_pair(build, **head_options):
    """The same random model patched with TRL's head and with fastpref's."""
    model = _seeded(build, 0)
    with torch.no_grad():  # a bias-free head, but a head whose rows differ from the embedding's scale
        model.get_output_embeddings().weight.mul_(3.0)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    trl_utils.add_fused_lm_head(theirs, **head_options)
    add_fused_lm_head(ours, **head_options)
    return theirs, ours


def _batch(vocab_size=97, rows=3, length=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, -3:] = -100  # right padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    return input_ids, attention_mask, labels


def _run(model, backward=True, forward_context=contextlib.nullcontext, **call):
    model.zero_grad()
    with forward_context():
        out = model(**call, fused_lm_head=True)
    if backward:  # through the loss and the entropy (the only differentiable per-token outputs)
        objective = out.loss + (0.0 if out.entropy is None else 0.3 * out.entropy.sum())
        objective.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same_outputs(expected, actual, atol=2e-5):
    for field in FIELDS + ("aux_loss",):
        want, got = getattr(expected, field), getattr(actual, field)
        if want is None:
            assert got is None, field
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, field
        if want.dtype == torch.bool:
            assert torch.equal(got, want), field
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=field)


def _assert_same_grads(expected, actual, tol=1e-4):
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        assert (actual[name] - want).norm() <= tol * want.norm() + 1e-7, name


@pytest.mark.parametrize("build", [llama, gemma2, granite], ids=["llama", "gemma2-softcap", "granite-logits_scaling"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_output_and_gradient_equals_trls_head(build, temperature):
    theirs, ours = _patched_pair(build, temperature=temperature, outputs=ALL_OUTPUTS)
    input_ids, attention_mask, labels = _batch()
    expected, expected_grads = _run(theirs, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    actual, grads = _run(ours, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert actual.log_probs.shape == (3, 10)
    assert not actual.log_probs[~actual.label_mask].any() and not actual.entropy[~actual.label_mask].any()
    assert actual.is_top1.any() or not expected.is_top1.any()
    _assert_same_outputs(expected, actual)
    assert "lm_head.weight" in grads and "model.layers.0.self_attn.q_proj.weight" in grads
    _assert_same_grads(expected_grads, grads)


def test_shift_labels_and_num_items_in_batch():
    theirs, ours = _patched_pair(llama, temperature=1.3, outputs=("log_probs", "entropy"))
    input_ids, attention_mask, labels = _batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shifted,
                num_items_in_batch=torch.tensor(40))
    expected, expected_grads = _run(theirs, **call)
    actual, grads = _run(ours, **call)
    assert actual.log_probs.shape == (3, 11) and actual.mean_logits is None and actual.is_top1 is None
    _assert_same_outputs(expected, actual)
    _assert_same_grads(expected_grads, grads)
    unshifted, _ = _run(ours, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(actual.log_probs[:, :-1], unshifted.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, unshifted.loss, rtol=0, atol=0)


def test_all_masked_micro_batch_is_differentiable_zero():
    _, ours = _patched_pair(llama, outputs=ALL_OUTPUTS)
    input_ids, attention_mask, labels = _batch()
    out, grads = _run(ours, input_ids=input_ids, attention_mask=attention_mask, labels=torch.full_like(labels, -100))
    assert out.loss.item() == 0.0 and not out.label_mask.any()
    assert not out.log_probs.any() and not out.entropy.any() and not out.is_top1.any()
    assert grads and all(not grad.any() for grad in grads.values())


def test_moe_load_balancing_loss_equals_trls_head():
    theirs, ours = _patched_pair(mixtral)
    input_ids, attention_mask, labels = _batch()
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected, expected_grads = _run(theirs, **call)
    actual, grads = _run(ours, **call)
    assert actual.aux_loss is not None and actual.aux_loss.item() > 0
    _assert_same_outputs(expected, actual)
    assert any("router" in name or "gate" in name for name in grads)
    _assert_same_grads(expected_grads, grads)


def test_cast_lm_head_to_fp32_under_bfloat16_autocast():
    theirs, ours = _patched_pair(llama, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    input_ids, attention_mask, labels = _batch()
    # the Trainer's way: the forward under autocast, the backward outside it
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    expected, expected_grads = _run(theirs, **call)
    actual, grads = _run(ours, **call)
    assert actual.log_probs.dtype == torch.float32
    _assert_same_outputs(expected, actual)  # the same bfloat16 backbone, a float32 head
    _assert_same_grads(expected_grads, grads)


def test_original_forward_and_signature_without_fused_lm_head():
    model = _seeded(llama, 0)
    input_ids, attention_mask, labels = _batch()
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    add_fused_lm_head(model, temperature=0.5)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert inspect.signature(model.forward) == inspect.signature(LlamaForCausalLM.forward.__get__(model))
    generated = model.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_head_and_backbone_are_looked_up_at_each_call():
    """PEFT wraps the model's modules after the patch; a LoRA adapter on the head is refused."""
    _, ours = _patched_pair(llama, outputs=("log_probs",))
    input_ids, attention_mask, labels = _batch()
    before = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs
    wrapped = peft.get_peft_model(ours, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    after = wrapped.base_model.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                     fused_lm_head=True).log_probs
    assert not torch.allclose(after, before)  # the adapted backbone ran
    _, head_adapted = _patched_pair(llama)
    head_adapted = peft.get_peft_model(head_adapted, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="plain torch.nn.Linear"):
        head_adapted.base_model.model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    with pytest.raises(ValueError, match="fused_lm_head=True needs labels"):
        ours(input_ids=input_ids, fused_lm_head=True)


@pytest.mark.parametrize("options, error, message", [
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"outputs": ("log_probs", "entropies")}, ValueError, r"outputs names \['entropies'\]"),
    ({"outputs": "entropy"}, TypeError, "outputs must be a tuple"),
])
def test_bad_arguments_are_refused_when_patching(options, error, message):
    model = _seeded(llama, 0)
    with pytest.raises(error, match=message):
        add_fused_lm_head(model, **options)


def test_use_fastpref_head_swaps_and_restores():
    import importlib

    modules = [importlib.import_module(name) for name in TRAINER_MODULES]
    original = [module.add_fused_lm_head for module in modules]
    assert all(head is trl_utils.add_fused_lm_head for head in original)
    with use_fastpref_head():
        assert all(module.add_fused_lm_head is add_fused_lm_head for module in modules)
        with use_fastpref_head():
            pass
        assert all(module.add_fused_lm_head is add_fused_lm_head for module in modules)
    assert [module.add_fused_lm_head for module in modules] == original
    swap = use_fastpref_head()
    assert all(module.add_fused_lm_head is add_fused_lm_head for module in modules)
    swap.restore()
    swap.restore()
    assert [module.add_fused_lm_head for module in modules] == original


# One step of each TRL trainer with TRL's head and with fastpref's.

PAIRS = {
    "prompt": ["Human: hi there, how are you?", "Human: what is two plus two?",
               "Human: tell me a joke.", "Human: where is Paris?"],
    "chosen": [" I am fine, thanks.", " Four.", " Why did the chicken cross the road?", " In France."],
    "rejected": [" Go away.", " Five, I think", " No.", " On the moon, obviously."],
}
UNPAIRED = {
    "prompt": PAIRS["prompt"] * 2,
    "completion": PAIRS["chosen"] + PAIRS["rejected"],
    "label": [True] * 4 + [False] * 4,
}


def _length_reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, save_strategy="no", seed=0)


def _dpo(tokenizer, tmp_path, policy, reference, batch_size=2):
    args = trl.DPOConfig(**_common_args(tmp_path), per_device_train_batch_size=batch_size, max_length=32)
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(PAIRS),
                          processing_class=tokenizer)


def _kto(tokenizer, tmp_path, policy, reference):
    args = trl.KTOConfig(**_common_args(tmp_path), per_device_train_batch_size=8, max_length=32)
    return trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(UNPAIRED),
                          processing_class=tokenizer)


def _online_args(config_class, tmp_path, batch_size, **options):
    return config_class(**_common_args(tmp_path), per_device_train_batch_size=batch_size, num_generations=2,
                        max_completion_length=5, temperature=0.9, beta=0.1, **options)


def _loads_as_reference(policy, reference, path):
    """GRPO and RLOO build their reference from the policy's name (a path here)."""
    if not os.path.isdir(path):
        reference.save_pretrained(path)
    policy.config._name_or_path = str(path)
    return policy


def _grpo(tokenizer, tmp_path, policy, reference, batch_size=4):
    prompts = Dataset.from_dict({"prompt": PAIRS["prompt"]})
    policy = _loads_as_reference(policy, reference, tmp_path / "reference")
    return trl.GRPOTrainer(model=policy, reward_funcs=_length_reward, train_dataset=prompts,
                           processing_class=tokenizer, args=_online_args(trl.GRPOConfig, tmp_path, batch_size))


def _rloo(tokenizer, tmp_path, policy, reference):
    prompts = Dataset.from_dict({"prompt": PAIRS["prompt"]})
    policy = _loads_as_reference(policy, reference, tmp_path / "reference")
    return trl.RLOOTrainer(model=policy, reward_funcs=_length_reward, train_dataset=prompts,
                           processing_class=tokenizer, args=_online_args(trl.RLOOConfig, tmp_path, 4))


def _first_batch(trainer):
    """The first training batch; GRPO and RLOO generate its completions, from a fixed seed."""
    trainer.model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _step(trainer, batch):
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before a step
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


TRAINERS = {"dpo": _dpo, "kto": _kto, "grpo": _grpo, "rloo": _rloo}
# Metrics computed from the head's outputs (the others follow from the loss's inputs).
HEAD_METRICS = {"dpo": ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "logps/chosen"),
                "kto": ("entropy", "logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected", "kl"),
                "grpo": ("entropy", "kl"), "rloo": ("entropy", "kl")}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trainer_step_equals_trls_head(tmp_path, tokenizer, name):
    build = TRAINERS[name]
    policy, reference = (_seeded(lambda: llama(len(tokenizer), tokenizer.pad_token_id), seed) for seed in (0, 1))
    theirs = build(tokenizer, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference))
    with use_fastpref_head():
        ours = build(tokenizer, tmp_path, copy.deepcopy(policy), copy.deepcopy(reference))
    for trainer, head in ((ours, add_fused_lm_head), (theirs, trl_utils.add_fused_lm_head)):
        for model in (trainer.model, trainer.ref_model):  # both patched by the head in use
            assert model.forward.__func__.__code__.co_filename == head.__code__.co_filename
    their_batch, batch = _first_batch(theirs), _first_batch(ours)
    for key, value in their_batch.items():
        if not torch.is_tensor(value):
            continue
        if value.is_floating_point():  # reference log-probs and the like, computed by each head
            torch.testing.assert_close(batch[key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:  # the same tokens (GRPO, RLOO: the same completions generated)
            assert torch.equal(batch[key], value), key
    (their_loss, their_grads, their_metrics), (loss, grads, metrics) = _step(theirs, their_batch), _step(ours, batch)
    assert loss.item() == pytest.approx(their_loss.item(), rel=1e-5, abs=1e-6)
    assert "lm_head.weight" in grads
    _assert_same_grads(their_grads, grads)
    for key in HEAD_METRICS[name]:
        assert key in metrics, key
        assert metrics[key] == pytest.approx(their_metrics[key], rel=1e-4, abs=1e-5), key


# FSDP2 on two gloo processes against one process.

def _fsdp2_worker(rank, port, tmp_path, grpo_batch, report):
    """Rank r takes its half of the batch: DPO pair r, GRPO rows 2r and 2r + 1 of a batch generated
    in one process; the models are wrapped as accelerate's FSDP2 wraps them (a group per decoder
    layer, the final norm and the LM head in a group kept gathered after forward, the root). Also a
    head sharded in a group of its own, under fastpref's head (refused) and TRL's. Rank 0 reports
    the gathered gradients."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tokenizer = default_tokenizer()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            reshard_after_forward=True)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        device=torch.device("cpu"), is_main_process=rank == 0)
    policy, reference = (_seeded(lambda: llama(len(tokenizer), tokenizer.pad_token_id), seed) for seed in (0, 1))

    def step(trainer, batch):
        model = fsdp2_prepare_model(accelerator, trainer.model)
        if trainer.ref_model is not None:
            trainer.ref_model = fsdp2_prepare_model(accelerator, trainer.ref_model)
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        losses = [None, None]
        dist.all_gather_object(losses, loss.item())
        return sum(losses) / 2, {name: p.grad.full_tensor() for name, p in model.named_parameters()}

    result = {}
    with use_fastpref_head():
        dpo = _dpo(tokenizer, tmp_path / "dpo", copy.deepcopy(policy), copy.deepcopy(reference), batch_size=1)
        grpo = _grpo(tokenizer, tmp_path, copy.deepcopy(policy), None, batch_size=2)
    result["dpo"] = step(dpo, dpo._prepare_inputs(dpo.data_collator([dpo.train_dataset[rank]])))
    half = {key: value[2 * rank:2 * rank + 2] if torch.is_tensor(value) and value.dim() else value
            for key, value in grpo_batch.items()}
    assert grpo.accelerator.num_processes == 2  # GRPO's token normaliser is per process
    result["grpo"] = step(grpo, half)

    input_ids, attention_mask, labels = _batch(len(tokenizer))
    for name, head in (("fastpref", add_fused_lm_head), ("trl", trl_utils.add_fused_lm_head)):
        model = copy.deepcopy(policy)
        head(model)
        fully_shard(model.lm_head)  # a group of its own, resharded after forward and never gathered here
        fully_shard(model)
        call = dict(input_ids=input_ids[rank::2], attention_mask=attention_mask[rank::2], labels=labels[rank::2])
        if name == "fastpref":
            with pytest.raises(ValueError) as refused:
                model(**call, fused_lm_head=True)
            result["sharded_head_refused"] = str(refused.value)
        else:
            model(**call, fused_lm_head=True).loss.backward()
            result["trl_sharded_head_grad"] = model.lm_head.weight.grad.full_tensor()
    if rank == 0:
        torch.save(result, report)
    dist.barrier()
    exit_without_teardown()


@pytest.mark.slow
def test_fsdp2_gradients_equal_one_process(tmp_path, tokenizer):
    """The head weight is read where FSDP2 holds it gathered, so its gradient is reduce-scattered
    like every other: two processes, each on half the batch, give the one-process gradients of
    DPO and GRPO on fastpref's head. A head FSDP2 still holds sharded is refused; TRL's head
    gathers it with full_tensor() and its gradient stays each process's own."""
    policy, reference = (_seeded(lambda: llama(len(tokenizer), tokenizer.pad_token_id), seed) for seed in (0, 1))
    with use_fastpref_head():
        dpo = _dpo(tokenizer, tmp_path / "dpo", copy.deepcopy(policy), copy.deepcopy(reference))
        grpo = _grpo(tokenizer, tmp_path, copy.deepcopy(policy), reference, batch_size=4)
    one_process = {"dpo": _step(dpo, dpo._prepare_inputs(dpo.data_collator([dpo.train_dataset[i] for i in range(2)])))}
    grpo_batch = _first_batch(grpo)
    one_process["grpo"] = _step(grpo, grpo_batch)
    head_model = copy.deepcopy(policy)
    add_fused_lm_head(head_model)
    input_ids, attention_mask, labels = _batch(len(tokenizer))
    # each process's loss is the mean over its own labels: the one-process gradient averages the two
    one_process_head = sum(
        torch.autograd.grad(head_model(input_ids=input_ids[r::2], attention_mask=attention_mask[r::2],
                                       labels=labels[r::2], fused_lm_head=True).loss,
                            head_model.lm_head.weight)[0] for r in range(2)) / 2

    report = tmp_path / "fsdp2.pt"
    mp.spawn(_fsdp2_worker, args=(_free_port(), tmp_path, grpo_batch, str(report)), nprocs=2, join=True)
    result = torch.load(report)
    for name in ("dpo", "grpo"):
        (loss, grads), (expected_loss, expected_grads, _) = result[name], one_process[name]
        assert loss == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-6), name
        assert "lm_head.weight" in grads
        _assert_same_grads(expected_grads, grads)
    assert "still a sharded DTensor" in result["sharded_head_refused"]
    assert "reshard_after_forward=False" in result["sharded_head_refused"]
    trl_grad = result["trl_sharded_head_grad"]
    assert (trl_grad - one_process_head).norm() > 0.1 * one_process_head.norm()
