"""Hugging Face heads with transformed logits: the transform read off the config as TRL reads it,
and computed by the fused op to the model's own logits (the models apply it in their forward)."""
import types

import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig)

from fastpref.causal_lm import causal_lm_parts, logit_transform
from fastpref.logit_transform import LogitTransform
from fastpref.train.reference import pair_logps
from fastpref.train.data import TokenizedPair
from reference import relative_error

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=False)
VOCAB = 101


@pytest.mark.parametrize("config, expected", [
    (LlamaConfig(), LogitTransform()),
    (Gemma2Config(final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
    (CohereConfig(logit_scale=0.0625), LogitTransform(logit_scale=0.0625)),
    (GraniteConfig(logits_scaling=8.0), LogitTransform(logit_scale=0.125)),
    (types.SimpleNamespace(model_type="hyperclovax", logits_scaling=4.0), LogitTransform(logit_scale=4.0)),
    (types.SimpleNamespace(output_multiplier=0.5), LogitTransform(logit_scale=0.5)),
    (types.SimpleNamespace(lm_head_multiplier=2.0, logits_scaling=8.0), LogitTransform(logit_scale=2.0)),
    (types.SimpleNamespace(logit_scale=None, final_logit_softcapping=None), LogitTransform()),
], ids=["llama", "gemma2", "cohere", "granite", "hyperclovax", "output_multiplier", "lm_head_multiplier-first",
        "none"])
def test_transform_from_config_follows_trl(config, expected):
    assert logit_transform(config) == expected


def test_temperature_joins_the_config_transform():
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0), temperature=0.7) == \
        LogitTransform(softcap=30.0, temperature=0.7)


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, head_dim=8, final_logit_softcapping=0.6, **SMALL))
    if kind == "granite":
        return GraniteForCausalLM(GraniteConfig(vocab_size=VOCAB, logits_scaling=0.25, **SMALL))
    return CohereForCausalLM(CohereConfig(vocab_size=VOCAB, logit_scale=3.0, **SMALL))


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_fused_log_probs_equal_the_models_own_logits(kind):
    """pair_logps (packed forward + fused op with the config's transform) against log_softmax of the
    logits the model's own forward returns, pair by pair."""
    model = _tiny(kind).eval()
    assert not causal_lm_parts(model).transform.is_identity
    pairs = [TokenizedPair(prompt_ids=[3, 4, 5], chosen_ids=[6, 7, 8, 9], rejected_ids=[10, 11], row=0),
             TokenizedPair(prompt_ids=[12, 13], chosen_ids=[14, 15], rejected_ids=[16, 17, 18], row=1)]
    got = pair_logps(model, pairs, "eager", "cpu", prefix_sharing=False)
    expected = []
    with torch.no_grad():
        for pair in pairs:
            for response in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([pair.prompt_ids + response])
                logits = model(input_ids=ids).logits[0, len(pair.prompt_ids) - 1:-1].double()
                expected.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())
    assert relative_error(got, torch.stack(expected)) <= 1e-5


def test_trainer_trains_a_soft_capped_model_folder(tmp_path, small_data):
    """fastpref train --model FOLDER of a Gemma-2: the loss takes the cap from its config."""
    from fastpref.train.default_assets import default_tokenizer
    from fastpref.train.loop import Trainer
    from test_trainer import config

    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer), head_dim=8, final_logit_softcapping=0.6, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SMALL))
    folder = tmp_path / "gemma2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trainer = Trainer(config(tmp_path, small_data, model=str(folder), max_steps=2, eval_steps=2))
    assert trainer.loss_fn.transform == LogitTransform(softcap=0.6)
    result = trainer.run()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
