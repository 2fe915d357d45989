"""What ``fastpref train`` uses when given nothing: bundled data, a tokenizer trained on it, a tiny Llama.

A run with no arguments has to work offline and in seconds, so nothing here is downloaded: the data
is the HH-RLHF sample shipped in the package (see :func:`fastpref.train.data.load_rows`), the
tokenizer a byte-level BPE trained on that sample in a fraction of a second, and the model a
randomly initialised two-layer Llama. Good for seeing the whole pipeline run, not for a useful model.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .data import load_rows

DEFAULT_VOCAB_SIZE = 2048
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
# Conversations rendered as the bundled HH-RLHF dialogues are written ("\n\nHuman: ...\n\nAssistant:
# ..."), the text the tokenizer was trained on and the embedded model learns from, so that the
# conversational format runs with the default model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set speaker = {'user': 'Human', 'assistant': 'Assistant'}.get(message['role'], message['role'] | capitalize) %}"
    "{{ '\n\n' + speaker + ': ' + message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train once per process; the BPE trainer is deterministic, so every process gets the same vocab."""
    rows = load_rows(None)
    texts = list(rows["chosen"]) + list(rows["rejected"])
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string encodes, with no unknown token, and decodes back exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEFAULT_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer.to_str()


def default_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 2048, BOS/EOS/PAD set, an HH-style chat template) trained on
    the bundled sample.

    The training runs once per process; each call returns a fresh wrapper around it, so a caller that
    sets, say, a chat template does not change the tokenizer every other caller gets.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def default_model_config(
    vocab_size: int,
    *,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> LlamaConfig:
    """A tiny Llama: hidden 128, 2 layers, 4 query and 2 key/value heads (grouped-query attention, as
    in current models), untied embeddings (so the LM head is its own weight, as the fused loss sees it)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def default_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """The default config sized to ``tokenizer``, randomly initialised from ``seed``, in float32.

    The seed is applied inside a forked RNG, so building the model leaves the caller's torch random
    state as it was.
    """
    config = default_model_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
