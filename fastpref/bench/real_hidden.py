"""Real inputs for the loss-head benchmark: a causal LM's final hidden states on the bundled
HH-RLHF pairs, and its LM-head weight.

Random hidden states and weights give flat next-token distributions. A trained model's are peaky,
most of the probability on a few tokens, and that is what a loss meets in training: the online
log-sum-exp's rescaling, and gradient filtering (Cut Cross-Entropy skips the vocabulary tiles whose
softmax stays below 2^-12 for every row) see real logits only with real inputs.

The batch is TRL's padded layout: the first B pairs of the sample (those that fit T tokens,
prompt + longer response), chosen rows first; each row holds prompt + response, right-padded to T;
targets are the next token on response positions and -100 on the prompt, the padding and the
last position of each sequence.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..train.data import load_rows, tokenize_pairs
from ..causal_lm import causal_lm_parts
from ..train.named_models import resolve_model
from ..train.reference import default_cache_dir
from .reference import IGNORE_INDEX

FORWARD_ROWS = 8  # sequences per no-grad forward: bounds the activations of the model's pass


def real_batch(model: str, pairs: int, seq_len: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [2B, T, H] in dtype, weight [V, H] in dtype, targets [2B, T]) of `model` (a named
    model or a local Hugging Face folder) on the first `pairs` pairs that fit `seq_len` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(model, default_cache_dir(), flag="--hidden-from")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    parts = causal_lm_parts(lm)  # refuses heads that are not a plain Linear
    if not parts.transform.is_identity:
        raise ValueError(f"--hidden-from {model}: its logits are transformed ({parts.transform}), which the "
                         "loss-head methods of the peers do not compute")
    if parts.head_bias is not None:
        raise ValueError(f"--hidden-from {model}: its LM head has a bias, which the loss-head methods do not take")
    examples, _ = tokenize_pairs(load_rows(None), tokenizer, max_length=seq_len, max_prompt_length=seq_len // 2)
    if len(examples) < pairs:
        raise ValueError(f"--hidden-from {model}: the bundled sample has {len(examples)} pairs that tokenize, "
                         f"{pairs} wanted (N / (2 T)); lower --tokens")
    chosen = [(e.prompt_ids, e.chosen_ids) for e in examples[:pairs]]
    rejected = [(e.prompt_ids, e.rejected_ids) for e in examples[:pairs]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    input_ids = torch.full((2 * pairs, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((2 * pairs, seq_len), dtype=torch.long)
    targets = torch.full((2 * pairs, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(chosen + rejected):
        ids = torch.tensor(prompt + response)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        # position t predicts token t + 1: the response's tokens are predicted from len(prompt) - 1 on
        targets[row, len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]

    hidden = torch.empty((2 * pairs, seq_len, lm.config.hidden_size), dtype=dtype, device=device)
    with torch.no_grad():
        for start in range(0, 2 * pairs, FORWARD_ROWS):
            rows = slice(start, start + FORWARD_ROWS)
            out = lm(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False,
                     output_hidden_states=True, logits_to_keep=1)
            hidden[rows] = out.hidden_states[-1].to(dtype)
    weight = parts.head_weight.detach().to(device=device, dtype=dtype).clone()
    return hidden, weight, targets.to(device)
