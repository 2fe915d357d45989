"""FastprefDPOTrainer against trl.DPOTrainer: the same collated batch and the same weights give
the same loss, gradients and logged metrics, for every loss type and option of TRL 1.16, on the
fused pair loss or on TRL's own loss code, and for every constructor form; padding_free=True gives
TRL's padded step; a policy equal to its reference has rewards exactly 0 (bfloat16); a float16
overflow reaches a GradScaler; what it cannot run fails at construction.

Tiny random Llama, Gemma-2 (soft-capped head) and Granite (scaled head), hidden 32, 2 layers, on
the offline tokenizer, fp32 on the CPU.
"""
import contextlib
import copy
import inspect
import json
import math
import os
import types

import pytest
import torch
import torch.multiprocessing as mp

import peft
import trl

from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, ProcessorMixin)

import fastpref  # noqa: E402
from fastpref.integrations import trl_head  # noqa: E402
from fastpref.integrations.trl import FastprefDPOTrainer, add_fused_lm_head, use_fastpref_head  # noqa: E402
from fastpref.train.default_assets import default_tokenizer  # noqa: E402
from test_distributed import _free_port, exit_without_teardown  # noqa: E402
from tiers import fast_only, first_fast  # noqa: E402

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "num_tokens", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy")
# logged by the fused pair loss beside TRL's: the share of non-finite log-probs
FASTPREF_METRICS = {"non_finite_logps"}
PAIRS = {
    "prompt": ["Human: hi there, how are you?", "Human: what is two plus two?",
               "Human: tell me a joke.", "Human: where is Paris?"],
    "chosen": [" I am fine, thanks.", " Four.", " Why did the chicken cross the road?", " In France."],
    "rejected": [" Go away.", " Five, I think", " No.", " On the moon, obviously."],
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small run fastest on one thread, and a busy machine's cores are not fought over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict(PAIRS)


def _llama_config(tokenizer, **options):
    options = {"tie_word_embeddings": False, **options}
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       pad_token_id=tokenizer.pad_token_id, **options)


def _seeded(build, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@pytest.fixture(scope="module")
def policy(models):
    """Never handed to a trainer itself (TRL patches the forward of the model it gets): copy it."""
    return models["llama"][0]


@pytest.fixture(scope="module")
def other_model(models):
    return models["llama"][1]


def _config(tmp_path, **options):
    options = {"per_device_train_batch_size": 2, "max_length": 32, "gradient_checkpointing": False,
               **options}
    return trl.DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                         save_strategy="no", seed=0, **options)


def _perturb(model):
    """Move the trainable weights off the reference's, as a few training steps would."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _build(cls, tmp_path, tokenizer, dataset, model, reference, **options):
    """reference: a model to use as ref_model; "precompute" (the initial policy, precomputed);
    "lora" (a fresh adapter from peft_config: the reference is the model with it disabled); or
    "peft_model" (a PeftModel with a trained adapter, which TRL copies into a frozen "ref" adapter,
    the reference)."""
    model, kwargs = copy.deepcopy(model), {}
    if reference == "precompute":
        options["precompute_ref_log_probs"] = True
    elif reference == "lora":
        kwargs["peft_config"] = _lora()
    elif reference == "peft_model":
        model = _seeded(lambda: peft.get_peft_model(model, _lora()), 2)  # LoRA A is random
        _perturb(model)  # a trained adapter, so that the "ref" copy differs from the base model
    else:
        kwargs["ref_model"] = copy.deepcopy(reference)
    trainer = cls(model=model, args=_config(tmp_path, **options), train_dataset=dataset,
                  processing_class=tokenizer, **kwargs)
    if isinstance(reference, str):
        _perturb(trainer.model)
    return trainer


def _with_fused_head(model):
    """A copy of `model` with fastpref's fused head, as FastprefDPOTrainer gives it."""
    model = copy.deepcopy(model)
    add_fused_lm_head(model)
    return model


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _step(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: param.grad for name, param in trainer.model.named_parameters() if param.requires_grad}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _assert_same_step(trl_step, fastpref_step):
    (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = trl_step, fastpref_step
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert grads.keys() == trl_grads.keys()
    for name, expected in trl_grads.items():
        assert expected is not None and grads[name] is not None, name
        assert (grads[name] - expected).norm() <= 1e-4 * expected.norm(), name
    assert metrics.keys() - FASTPREF_METRICS == trl_metrics.keys() and set(TRL_METRICS) <= metrics.keys()
    for key, expected in trl_metrics.items():
        assert metrics[key] == pytest.approx(expected, rel=1e-4, abs=1e-6), key


def _llama(tokenizer):
    return LlamaForCausalLM(_llama_config(tokenizer))


def _gemma2(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a cap small enough to bend a tiny random model's logits
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=tokenizer.pad_token_id, final_logit_softcapping=0.6,
        tie_word_embeddings=False))


def _granite(tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, logits_scaling=0.25, tie_word_embeddings=False))


FAMILIES = {"llama": _llama, "gemma2": _gemma2, "granite": _granite}


@pytest.fixture(scope="module")
def models(tokenizer):
    """family -> (policy, another model of the same family as reference)."""
    return {name: (_seeded(lambda: build(tokenizer), 0), _seeded(lambda: build(tokenizer), 1))
            for name, build in FAMILIES.items()}


def _compare(tmp_path, tokenizer, dataset, policy, reference, options, fused):
    """One step of both trainers on their first batch; `fused`: whether fastpref's takes the fused pair loss."""
    trl_trainer = _build(trl.DPOTrainer, tmp_path, tokenizer, dataset, policy, reference, **options)
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, reference, **options)
    assert trainer.uses_fused_loss == fused
    trl_batch, batch = _first_batch(trl_trainer), _first_batch(trainer)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(batch["completion_mask"], trl_batch["completion_mask"])
    step = _step(trainer, batch)
    assert reference in ("lora", "peft_model") or "lm_head.weight" in step[1]  # LoRA: frozen head
    _assert_same_step(_step(trl_trainer, trl_batch), step)
    return trainer


# every case takes the fused pair loss (True): every TRL loss type and option is a row of fastpref.loss_types
CASES = [
    pytest.param({"loss_type": ["sigmoid"]}, "other", True, id="sigmoid-ref_model", marks=pytest.mark.smoke),
    pytest.param({"loss_type": ["sigmoid"]}, "precompute", True, id="sigmoid-precomputed"),
    pytest.param({"loss_type": ["sigmoid"]}, "lora", True, id="sigmoid-lora"),
    pytest.param({"loss_type": ["sigmoid"]}, "peft_model", True, id="sigmoid-peft_ref_adapter"),
    pytest.param({"loss_type": ["ipo"]}, "other", True, id="ipo-ref_model"),
    pytest.param({"loss_type": ["hinge"], "label_smoothing": 0.1}, "precompute", True, id="hinge-precomputed"),
    pytest.param({"loss_type": ["robust"], "label_smoothing": 0.2}, "other", True, id="robust-ref_model"),
    pytest.param({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, "precompute", True,
                 id="rpo-precomputed"),
    pytest.param({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.7, 0.3]}, "other", True, id="rpo-ref_model"),
    pytest.param({"loss_type": ["apo_zero"]}, "other", True, id="apo_zero-ref_model"),
    pytest.param({"loss_type": ["apo_down"], "beta": 0.5}, "other", True, id="apo_down-ref_model"),
    pytest.param({"loss_type": ["sft"]}, "other", True, id="sft-ref_model"),
    # the types and options fastpref computed with TRL's loss code until its table had them all
    pytest.param({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, "other", True, id="exo_pair",
                 marks=pytest.mark.smoke),
    pytest.param({"loss_type": ["nca_pair"]}, "other", True, id="nca_pair"),
    pytest.param({"loss_type": ["bco_pair"]}, "lora", True, id="bco_pair-lora"),
    pytest.param({"loss_type": ["sppo_hard"], "beta": 0.5}, "other", True, id="sppo_hard"),
    pytest.param({"loss_type": ["aot"], "label_smoothing": 0.1}, "other", True, id="aot"),
    pytest.param({"loss_type": ["aot_unpaired"]}, "precompute", True, id="aot_unpaired-precomputed"),
    pytest.param({"loss_type": ["discopop"], "discopop_tau": 0.1}, "other", True, id="discopop"),
    pytest.param({"loss_type": ["sigmoid_norm"]}, "peft_model", True, id="sigmoid_norm-peft_ref_adapter"),
    pytest.param({"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5]}, "other", True, id="list"),
    pytest.param({"f_divergence_type": "forward_kl"}, "other", True, id="forward_kl"),
    pytest.param({"f_divergence_type": "js_divergence", "loss_type": ["hinge"]}, "other", True, id="js_divergence"),
    pytest.param({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, "other", True,
                 id="alpha_divergence"),
    pytest.param({"use_weighting": True}, "other", True, id="wpo"),
    pytest.param({"ld_alpha": 0.5}, "other", True, id="ld_alpha-ref_model"),
    pytest.param({"ld_alpha": 0.3, "loss_type": ["ipo"]}, "precompute", True, id="ld_alpha-precomputed"),
    pytest.param({"label_smoothing": 0.1}, "other", True, id="label_smoothing-sigmoid"),
    pytest.param({"loss_type": ["robust", "sigmoid"], "label_smoothing": 0.1}, "other", True,
                 id="label_smoothing-robust+sigmoid"),
]


@pytest.mark.parametrize("options, reference, fused",
                         fast_only(CASES, {"sigmoid-ref_model", "sigmoid-lora", "exo_pair", "wpo"}))
def test_matches_trl(tmp_path, tokenizer, dataset, models, options, reference, fused):
    policy, other = models["llama"]
    _compare(tmp_path, tokenizer, dataset, policy, other if reference == "other" else reference, options, fused)


# every loss type and option at once, on the soft-capped and the scaled heads too
FAMILY_CASES = [
    pytest.param({"loss_type": ["sigmoid", "hinge", "ipo", "apo_zero", "apo_down", "sft"],
                  "loss_weights": [1.0, 0.5, 0.3, 0.2, 0.4, 0.6]}, "other", True, id="fused-types"),
    pytest.param({"loss_type": ["robust"], "label_smoothing": 0.2}, "precompute", True, id="fused-robust"),
    pytest.param({"loss_type": ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "discopop",
                                "sigmoid_norm"], "loss_weights": [1.0, 0.9, 0.8, 0.1, 0.6, 0.5, 0.4, 0.3],
                  "label_smoothing": 0.1}, "other", True, id="trl-types"),
    pytest.param({"label_smoothing": 0.1, "f_divergence_type": "js_divergence", "use_weighting": True,
                  "ld_alpha": 0.5}, "precompute", True, id="trl-options"),
]


@pytest.mark.parametrize("options, reference, fused", first_fast(FAMILY_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_option_on_each_head_matches_trl(tmp_path, tokenizer, dataset, models, family, options, reference,
                                               fused):
    """TRL's head reads the soft cap and the scale off the config; fastpref's op computes them."""
    policy, other = models[family]
    trainer = _compare(tmp_path, tokenizer, dataset, policy, other if reference == "other" else reference,
                       options, fused)
    if fused:
        assert trainer.fastpref_loss.transform.is_identity == (family == "llama")


def _mixtral(tokenizer):
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id))


def test_models_get_fastpref_head(tmp_path, tokenizer, dataset, policy, other_model, monkeypatch):
    """TRL's __init__ patches the policy and the reference model with fastpref's head, not TRL's: it is
    what TRL's loss code, and the reference log-probs on every path, run on."""
    patched = []

    def counted(model, *args, **kwargs):
        patched.append(model)
        return add_fused_lm_head(model, *args, **kwargs)

    monkeypatch.setattr(trl_head, "add_fused_lm_head", counted)
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, other_model, loss_type=["nca_pair"])
    assert patched == [trainer.model, trainer.ref_model]
    assert trl.trainer.dpo_trainer.add_fused_lm_head is trl.trainer.utils.add_fused_lm_head  # restored


def test_moe_router_aux_loss_matches_trl(tmp_path, tokenizer, dataset):
    model, reference = _seeded(lambda: _mixtral(tokenizer), 0), _seeded(lambda: _mixtral(tokenizer), 1)
    trl_trainer = _build(trl.DPOTrainer, tmp_path, tokenizer, dataset, model, reference)
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, model, reference)
    assert trainer.aux_loss_enabled and trl_trainer.aux_loss_enabled
    trl_step, step = _step(trl_trainer, _first_batch(trl_trainer)), _step(trainer, _first_batch(trainer))
    assert "aux_loss" in step[2]
    _assert_same_step(trl_step, step)


def test_final_hidden_state_is_the_backbone_output(policy):
    """The trainer reads hidden_states[-1] of the full model's forward with logits_to_keep=1."""
    input_ids = torch.randint(3, policy.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    with torch.no_grad():
        outputs = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=True, logits_to_keep=1)
        backbone = policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    assert outputs.logits.shape == (2, 1, policy.config.vocab_size)
    assert torch.equal(outputs.hidden_states[-1], backbone.last_hidden_state)


def test_precomputed_reference_is_computed_by_fastpref(tmp_path, tokenizer, dataset, policy, monkeypatch):
    """Precomputed values equal fastpref's online ones bit for bit and TRL's to float32 rounding,
    and are not TRL's read back from its cache (same dataset, same weights)."""
    trl_trainer = _build(trl.DPOTrainer, tmp_path, tokenizer, dataset, policy, "precompute")
    calls = []
    compute = FastprefDPOTrainer.compute_ref_log_probs

    def counted(self, model, inputs):
        calls.append(len(inputs["input_ids"]))
        return compute(self, model, inputs)

    monkeypatch.setattr(FastprefDPOTrainer, "compute_ref_log_probs", counted)
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, "precompute")
    assert sum(calls) == 2 * len(dataset)  # chosen and rejected rows of every pair

    # The precomputation's first batch: rows 0 and 1, in order, padded together.
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    # The trainer's policy has moved (_perturb); the reference is the initial one.
    chosen, rejected = trainer.compute_ref_log_probs(_with_fused_head(policy), batch)
    assert torch.equal(chosen, batch["ref_chosen_logps"])
    assert torch.equal(rejected, batch["ref_rejected_logps"])
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(trainer.train_dataset[key]),
                                   torch.tensor(trl_trainer.train_dataset[key]), rtol=1e-5, atol=0)


def test_return_outputs_runs_an_extra_forward_for_the_logits(tmp_path, tokenizer, dataset, policy, other_model):
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, other_model)
    batch = _first_batch(trainer)
    with torch.no_grad(), pytest.warns(UserWarning, match="extra forward"):
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert outputs.logits.shape == (*batch["input_ids"].shape, policy.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loss, trainer.compute_loss(trainer.model, batch))


def test_train_and_evaluate(tmp_path, tokenizer, dataset, policy):
    """A real loop: accelerate's wrapping, gradient checkpointing, precomputed reference, logging."""
    args = _config(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-2,
                   gradient_checkpointing=True, precompute_ref_log_probs=True)
    model = copy.deepcopy(policy)
    trainer = FastprefDPOTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                 processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert set(TRL_METRICS) <= entry.keys()
        assert all(torch.isfinite(torch.tensor(entry[key])) for key in TRL_METRICS)
    assert not torch.equal(model.lm_head.weight, policy.lm_head.weight)
    metrics = trainer.evaluate()
    assert {f"eval_{key}" for key in TRL_METRICS if key != "num_tokens"} <= metrics.keys()
    assert metrics["eval_rewards/margins"] > 0  # two steps of lr 1e-2 on the same pairs


def _ddp_worker(rank, port, output_dir, report):
    """One SGD step of TRL's and of fastpref's trainer on 2 gloo ranks, one pair per rank."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tokenizer = default_tokenizer()
    policy, reference = (_seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer)), seed) for seed in (0, 1))
    weights = {}
    for cls in (trl.DPOTrainer, FastprefDPOTrainer):
        trainer = _build(cls, output_dir, tokenizer, Dataset.from_dict(PAIRS), policy, reference,
                         per_device_train_batch_size=1, max_steps=1, optim="sgd", learning_rate=0.1)
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        weights[cls] = torch.cat([p.detach().reshape(-1) for p in trainer.accelerator.unwrap_model(
            trainer.model).parameters()])
    ranks = [torch.empty_like(weights[FastprefDPOTrainer]) for _ in range(2)]
    dist.all_gather(ranks, weights[FastprefDPOTrainer])
    if rank == 0:
        initial = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
        step = weights[trl.DPOTrainer] - initial
        with open(report, "w") as handle:
            json.dump({"ranks_agree": torch.equal(ranks[0], ranks[1]), "step": step.norm().item(),
                       "difference": (weights[FastprefDPOTrainer] - weights[trl.DPOTrainer]).norm().item()},
                      handle)
    dist.barrier()
    exit_without_teardown()


@pytest.mark.slow
def test_ddp_step_matches_trl(tmp_path):
    """Through DDP, gradients are averaged over the ranks (which see different pairs): the ranks
    stay identical, and the step is TRL's."""
    report = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(_free_port(), tmp_path, str(report)), nprocs=2, join=True)
    result = json.loads(report.read_text())
    assert result["ranks_agree"]
    assert result["step"] > 0 and result["difference"] <= 1e-5 * result["step"]


@pytest.mark.parametrize("options, reference", [
    pytest.param({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, "other", id="rpo-ref_model"),
    pytest.param({"loss_type": ["ipo"]}, "precompute", id="ipo-precomputed"),
    pytest.param({"loss_type": ["sigmoid"]}, "lora", id="sigmoid-lora"),
    # every TRL option is on the table, so packs too
    pytest.param({"loss_type": ["nca_pair", "bco_pair"], "use_weighting": True}, "other", id="nca_pair+bco_pair-wpo"),
    pytest.param({"loss_type": ["aot", "exo_pair"], "label_smoothing": 0.1}, "other", id="aot+exo_pair"),
    pytest.param({"ld_alpha": 0.5, "f_divergence_type": "js_divergence"}, "precompute", id="ld_alpha-js"),
])
@pytest.mark.parametrize("family", first_fast(FAMILIES))
def test_padding_free_matches_trl_padded(tmp_path, tokenizer, dataset, models, family, options, reference):
    """padding_free=True: chosen and rejected rows back to back in one row, positions restarting per
    sequence, block-diagonal attention; TRL's padded step (TRL 1.16 turns padding_free off)."""
    policy, other = models[family]
    reference = other if reference == "other" else reference
    trl_trainer = _build(trl.DPOTrainer, tmp_path, tokenizer, dataset, policy, reference, **options)
    trainer = _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, reference, padding_free=True,
                     **options)
    assert trainer.padding_free and trainer.args.padding_free and not trl_trainer.padding_free
    trl_batch, batch = _first_batch(trl_trainer), _first_batch(trainer)
    packed = batch["packed"]
    real = trl_batch["attention_mask"].bool()
    assert packed.input_ids.shape == (1, real.sum())  # no padding
    assert torch.equal(packed.input_ids[0], trl_batch["input_ids"][real])
    assert torch.equal(packed.position_ids[0], torch.cat([torch.arange(n) for n in real.sum(1).tolist()]))
    _assert_same_step(_step(trl_trainer, trl_batch), _step(trainer, batch))
    if reference == "precompute":  # precomputed by the same packed forward as the online values
        chosen, rejected = trainer.compute_ref_log_probs(_with_fused_head(policy), batch)
        torch.testing.assert_close(chosen, batch["ref_chosen_logps"], rtol=1e-6, atol=0)
        torch.testing.assert_close(rejected, batch["ref_rejected_logps"], rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_padding_free_flash_attention_varlen_matches_padded(tmp_path, tokenizer, dataset):
    """On a GPU with flash-attn: the packed step through flash-attention's varlen path (segments read
    off the restarting position ids) equals the padded sdpa step, to bfloat16 rounding."""
    pytest.importorskip("flash_attn")
    policy, reference = _seeded(lambda: _llama(tokenizer), 0), _seeded(lambda: _llama(tokenizer), 1)
    steps = []
    for padding_free, attention in ((False, "sdpa"), (True, "flash_attention_2")):
        models = [copy.deepcopy(m).to("cuda", torch.bfloat16) for m in (policy, reference)]
        for model in models:
            model.set_attn_implementation(attention)
        args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=True, save_strategy="no", seed=0,
                             per_device_train_batch_size=2, max_length=32, gradient_checkpointing=False,
                             padding_free=padding_free)
        trainer = FastprefDPOTrainer(model=models[0], ref_model=models[1], args=args, train_dataset=dataset,
                                     processing_class=tokenizer)
        steps.append(_step(trainer, _first_batch(trainer)))
    (padded_loss, padded_grads, _), (loss, grads, _) = steps
    assert loss.item() == pytest.approx(padded_loss.item(), rel=2e-2)
    for name, expected in padded_grads.items():
        assert (grads[name].float() - expected.float()).norm() <= 5e-2 * expected.float().norm(), name


def test_pack_rows_refuses_left_padding():
    from fastpref.train.packing import pack_rows

    ids = torch.tensor([[5, 6, 7], [0, 5, 8]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        pack_rows(ids, mask, torch.tensor([[0, 1, 1], [0, 0, 1]]))


def _trained(cls, tmp_path, tokenizer, dataset, policy, reference, **options):
    trainer = _build(cls, tmp_path, tokenizer, dataset, policy, reference, optim="sgd", learning_rate=0.5,
                     logging_steps=1, **options)
    trainer.train()
    return trainer


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for _, p in sorted(model.named_parameters())])


@pytest.mark.parametrize("family, options", first_fast([
    pytest.param("llama", {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5,
                           "max_steps": 2}, id="llama-sync_ref_model"),
    pytest.param("gemma2", {"loss_type": ["bco_pair"], "use_weighting": True, "max_steps": 1},
                 id="gemma2-trl_loss"),
    pytest.param("granite", {"padding_free": True, "max_steps": 1}, id="granite-padding_free"),
]))
def test_train_steps_match_trl(tmp_path, tokenizer, dataset, models, family, options):
    """Real trainer.train() steps (SGD): the weights, the reference's (TR-DPO's syncing: the reference
    is pulled toward the policy after each step), the logged metrics and evaluate()'s are TRL's."""
    policy, other = models[family]
    trl_options = {key: value for key, value in options.items() if key != "padding_free"}
    trl_trainer = _trained(trl.DPOTrainer, tmp_path, tokenizer, dataset, policy, other, **trl_options)
    trainer = _trained(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, other, **options)
    for role in ("model", "ref_model"):
        initial = _flat(policy if role == "model" else other)
        expected, weights = _flat(getattr(trl_trainer, role)), _flat(getattr(trainer, role))
        moved = (expected - initial).norm()
        assert (role == "ref_model" and not options.get("sync_ref_model")) or moved > 0, role
        assert (weights - expected).norm() <= 1e-4 * max(moved, 1e-3 * initial.norm()), role
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected = [entry for entry in trl_trainer.state.log_history if "loss" in entry]
    assert len(logged) == len(expected) == options["max_steps"]
    for entry, trl_entry in zip(logged, expected):
        assert entry.keys() - FASTPREF_METRICS == trl_entry.keys()
        for key in set(TRL_METRICS) | {"loss"}:
            assert entry[key] == pytest.approx(trl_entry[key], rel=1e-4, abs=1e-6), key
    evaluated, trl_evaluated = trainer.evaluate(dataset), trl_trainer.evaluate(dataset)
    for key in {f"eval_{key}" for key in TRL_METRICS} | {"eval_loss"}:
        assert evaluated[key] == pytest.approx(trl_evaluated[key], rel=1e-4, abs=1e-6), key


def _relative_difference(grads, expected):
    return max(((grads[name] - value).norm() / value.norm()).item() for name, value in expected.items())


def _fsdp2_worker(rank, port, output_dir, report):
    """One step of TRL's and of fastpref's trainer on 2 gloo ranks, one pair per rank, with the
    models wrapped as accelerate's FSDP2 plugin wraps them (fsdp2_prepare_model: a group per decoder
    layer, the embedding, the final norm + LM head kept gathered after forward, the root), for an
    untied and a tied head; the same step of TRL's trainer in one process on both pairs; and a
    model whose LM head reshards after forward. Rank 0 reports."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tokenizer, pairs = default_tokenizer(), Dataset.from_dict(PAIRS)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            reshard_after_forward=True)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        device=torch.device("cpu"), is_main_process=rank == 0)
    result = {}
    for tied in (False, True):
        policy, reference = (_seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer, tie_word_embeddings=tied)),
                                     seed) for seed in (0, 1))
        steps = {}
        for cls in (trl.DPOTrainer, FastprefDPOTrainer):
            trainer = _build(cls, output_dir, tokenizer, pairs, policy, reference, per_device_train_batch_size=1)
            model = fsdp2_prepare_model(accelerator, trainer.model)
            trainer.ref_model = fsdp2_prepare_model(accelerator, trainer.ref_model)
            batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[rank]]))
            model.train()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            steps[cls] = loss.item(), {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        single = _build(trl.DPOTrainer, output_dir, tokenizer, pairs, policy, reference, per_device_train_batch_size=2)
        batch = single._prepare_inputs(single.data_collator([single.train_dataset[i] for i in range(2)]))
        single.model.train()
        single.compute_loss(single.model, batch).backward()
        one_process = {name: p.grad for name, p in single.model.named_parameters()}
        (trl_loss, trl_grads), (loss, grads) = steps[trl.DPOTrainer], steps[FastprefDPOTrainer]
        losses = [None, None]
        dist.all_gather_object(losses, (trl_loss, loss))
        result[f"tied={tied}"] = {
            "loss": max(abs(b - a) / abs(a) for a, b in losses),
            "gradients": _relative_difference(grads, trl_grads),
            "trl_vs_one_process": _relative_difference(trl_grads, one_process),
            "fastpref_vs_one_process": _relative_difference(grads, one_process),
            "head_in_grads": "lm_head.weight" in grads or "model.embed_tokens.weight" in grads,
        }

    policy, reference = (_seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer)), seed) for seed in (0, 1))
    trainer = _build(FastprefDPOTrainer, output_dir, tokenizer, pairs, policy, reference,
                     per_device_train_batch_size=1)
    fully_shard(trainer.model.lm_head)  # a non-root group: resharded after forward
    fully_shard(trainer.model)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[rank]]))
    with pytest.raises(ValueError) as refused:
        trainer.compute_loss(trainer.model, batch)
    result["sharded_head"] = str(refused.value)
    if rank == 0:
        with open(report, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    exit_without_teardown()


@pytest.mark.slow
def test_fsdp2_step_matches_trl_and_one_process(tmp_path):
    """Under accelerate's FSDP2 wrapping the head weight is read after the forward, gathered, and its
    gradient is reduce-scattered like the others: loss and gradients are TRL's under the same
    FSDP2 wrapping, and the one-process step's on the global batch."""
    report = tmp_path / "fsdp2.json"
    mp.spawn(_fsdp2_worker, args=(_free_port(), tmp_path, str(report)), nprocs=2, join=True)
    result = json.loads(report.read_text())
    for head in ("tied=False", "tied=True"):
        step = result[head]
        assert step["head_in_grads"], head
        assert step["loss"] <= 1e-5 and step["gradients"] <= 1e-5, (head, step)
        assert step["trl_vs_one_process"] <= 1e-5 and step["fastpref_vs_one_process"] <= 1e-5, (head, step)
    assert "still sharded after the model's forward" in result["sharded_head"]
    assert "reshard_after_forward=False" in result["sharded_head"]


@pytest.mark.parametrize("fsdp_options, environment", [
    ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {}),
    ({}, {"ACCELERATE_USE_FSDP": "true"}),  # accelerate launch's FSDP without a version is FSDP1
    ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}),
], ids=["fsdp_config", "accelerate-default", "accelerate-version-1"])
def test_refuses_fsdp1(tmp_path, tokenizer, dataset, policy, other_model, monkeypatch, fsdp_options, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="fsdp version=1 .*use FSDP2"):
        _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, policy, other_model, **fsdp_options)


def test_refuses_prompt_learning_peft(tmp_path, tokenizer, dataset, policy):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="peft_config=PromptTuningConfig"):
        FastprefDPOTrainer(model=copy.deepcopy(policy), args=_config(tmp_path), train_dataset=dataset,
                           processing_class=tokenizer, peft_config=config)
    with pytest.raises(ValueError, match="peft_config=PromptTuningConfig"):
        FastprefDPOTrainer(model=peft.get_peft_model(copy.deepcopy(policy), config), args=_config(tmp_path),
                           train_dataset=dataset, processing_class=tokenizer)


def test_refuses_vision_language_models(tmp_path, tokenizer, dataset, policy, other_model):
    class Processor(ProcessorMixin):
        attributes = ["tokenizer"]
        tokenizer_class = "PreTrainedTokenizerFast"

    with pytest.raises(ValueError, match="processing_class=Processor"):
        FastprefDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(other_model),
                           args=_config(tmp_path), train_dataset=dataset, processing_class=Processor(tokenizer))


def test_models_without_logits_to_keep_run_trl_loss_code(tmp_path, tokenizer, dataset, other_model):
    """The fused pair loss needs logits_to_keep to keep the model from building the logits; without it
    the step is TRL's loss code on the fused head, and padding_free=True is refused."""
    class NoLogitsToKeep(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model = _seeded(lambda: NoLogitsToKeep(_llama_config(tokenizer)), 0)
    _compare(tmp_path, tokenizer, dataset, model, other_model, {}, fused=False)
    with pytest.raises(ValueError, match="padding_free=True with model=NoLogitsToKeep.*logits_to_keep"):
        _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, model, other_model, padding_free=True)


def test_padding_free_refuses_the_moe_aux_loss(tmp_path, tokenizer, dataset):
    model = _seeded(lambda: _mixtral(tokenizer), 0)
    with pytest.raises(ValueError, match=r"padding_free=True with router_aux_loss_coef=0\.05"):
        _build(FastprefDPOTrainer, tmp_path, tokenizer, dataset, model, "precompute", padding_free=True)


# -- what TRL's own test suite teaches: the constructor forms of TRL's quick start, the same
# log-probs in the policy's and the reference's pass, NaN and inf let through to a GradScaler ----------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, models):
    """Two saved models with the tokenizer beside them: "policy" and "reference"."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, model in zip(("policy", "reference"), models["llama"]):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def test_the_signature_is_trls():
    assert inspect.signature(FastprefDPOTrainer) == inspect.signature(trl.DPOTrainer)


def _built(cls, tmp_path, dataset, **arguments):
    options = arguments.pop("options", {})
    return cls(args=_config(tmp_path, **options), train_dataset=dataset, **arguments)


CONSTRUCTOR_FORMS = {
    # name: (FastprefDPOTrainer's arguments, trl.DPOTrainer's), "policy"/"reference" standing for a saved model's
    # folder, "tokenizer" for the tokenizer
    "string model": ({"model": "policy", "processing_class": "tokenizer"},
                     {"model": "policy", "processing_class": "tokenizer"}),
    "string reference": ({"model": "policy", "ref_model": "reference", "processing_class": "tokenizer"},
                         {"model": "policy", "ref_model": "loaded reference", "processing_class": "tokenizer"}),
    "dtype in model_init_kwargs": ({"model": "policy", "options": {"model_init_kwargs": {"dtype": torch.float64}}},
                                   {"model": "policy", "options": {"model_init_kwargs": {"dtype": torch.float64}}}),
    "no processing class": ({"model": "policy"}, {"model": "policy"}),
    "peft config": ({"model": "policy", "peft_config": "lora"}, {"model": "policy", "peft_config": "lora"}),
}


def _resolved(arguments, model_dirs, tokenizer):
    resolved = dict(arguments)
    for key, value in arguments.items():
        if value in ("policy", "reference"):
            resolved[key] = model_dirs[value]
        elif value == "loaded reference":
            resolved[key] = AutoModelForCausalLM.from_pretrained(model_dirs["reference"])
        elif value == "tokenizer":
            resolved[key] = tokenizer
        elif value == "lora":
            resolved[key] = _lora()
    return resolved


@pytest.mark.parametrize("form", CONSTRUCTOR_FORMS)
def test_each_constructor_form_steps_as_trl(tmp_path, tokenizer, dataset, model_dirs, form):
    ours, theirs = (_resolved(arguments, model_dirs, tokenizer) for arguments in CONSTRUCTOR_FORMS[form])
    trainer = _seeded(lambda: _built(FastprefDPOTrainer, tmp_path, dataset, **ours), 3)
    trl_trainer = _seeded(lambda: _built(trl.DPOTrainer, tmp_path, dataset, **theirs), 3)
    assert trainer.uses_fused_loss
    if form == "dtype in model_init_kwargs":
        assert trainer.model.dtype == torch.float64
    if form == "string reference":
        assert isinstance(trainer.ref_model, torch.nn.Module)
        with torch.no_grad():  # the reference is the other model, not a copy of the policy
            assert not torch.equal(trainer.ref_model.lm_head.weight, trainer.model.lm_head.weight)
    batch, trl_batch = _first_batch(trainer), _first_batch(trl_trainer)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    _assert_same_step(_step(trl_trainer, trl_batch), _step(trainer, batch))


def _first_logged_step(cls, tmp_path, dataset, model_dirs, lora=False, **options):
    trainer = cls(model=model_dirs["policy"], args=trl.DPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=True, save_strategy="no", seed=0,
        per_device_train_batch_size=2, max_length=32, max_steps=1, logging_steps=1, **options),
        train_dataset=dataset, peft_config=_lora() if lora else None)
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("setting", [
    pytest.param({}, id="reference-copy"),
    pytest.param({"loss_type": ["ipo"]}, id="ipo"),
    pytest.param({"precompute_ref_log_probs": True}, id="precomputed"),
    pytest.param({"padding_free": True}, id="padding_free"),
])
def test_a_policy_equal_to_its_reference_has_rewards_exactly_zero_in_bfloat16(tmp_path, dataset, model_dirs,
                                                                                setting):
    """TRL's default mixed precision: at the first step the policy is its reference, and the two passes
    must give the same log-probs bit for bit, as TRL's do (its loss is then ln 2 exactly for sigmoid)."""
    logged = _first_logged_step(FastprefDPOTrainer, tmp_path, dataset, model_dirs, **setting)
    assert logged["rewards/chosen"] == logged["rewards/rejected"] == logged["rewards/margins"] == 0.0
    if not setting:
        expected = _first_logged_step(trl.DPOTrainer, tmp_path, dataset, model_dirs)
        assert expected["rewards/margins"] == 0.0 and logged["loss"] == expected["loss"] == pytest.approx(math.log(2))


def test_a_fresh_adapter_has_rewards_exactly_zero_in_bfloat16(tmp_path, dataset, model_dirs):
    """LoRA: the reference is the model with its adapter disabled, equal to the policy while B = 0."""
    logged = _first_logged_step(FastprefDPOTrainer, tmp_path, dataset, model_dirs, lora=True)
    assert logged["rewards/chosen"] == logged["rewards/margins"] == 0.0


def _overflowing(model):
    """A model whose final hidden states overflow float16 (65,504) on the head's input."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)
    return model


@pytest.mark.parametrize("trainer_kind", ["FastprefDPOTrainer", "DPOTrainer on fastpref's head"])
def test_a_float16_overflow_on_the_head_makes_the_grad_scaler_skip_the_step(tmp_path, tokenizer, dataset, policy,
                                                                            trainer_kind):
    """As in PyTorch and TRL: the overflow's inf reaches the loss and the gradients instead of an
    exception, the GradScaler skips the update and halves its scale; fastpref raises it only when
    asked (raise_pending_errors(non_finite=True))."""
    head = use_fastpref_head() if trainer_kind != "FastprefDPOTrainer" else contextlib.nullcontext()
    cls = FastprefDPOTrainer if trainer_kind == "FastprefDPOTrainer" else trl.DPOTrainer
    with head:
        trainer = cls(model=_overflowing(policy), ref_model=copy.deepcopy(policy), args=_config(tmp_path),
                      train_dataset=dataset, processing_class=tokenizer)
    batch = _first_batch(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer.model.train()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.compute_loss(trainer.model, batch)
    assert not torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(weights[name], p) for name, p in trainer.model.named_parameters())
    if trainer_kind == "FastprefDPOTrainer":
        assert trainer._metrics["train"]["non_finite_logps"][-1] > 0
    fastpref.raise_pending_errors()  # not an error: a value let through
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="non-finite log-probability"):
        fastpref.raise_pending_errors(non_finite=True)
