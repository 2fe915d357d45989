"""Sampling a policy's responses: K per prompt, batched with transformers' generate and its KV cache.

Each batch is sampled from a seed of its own (the run's seed, the round and the batch's first
prompt), so that a resumed round samples exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float

    def check(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"generations_per_prompt must be >= 1, got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding would give the K responses of a prompt "
                             f"alike: no pair), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def batch_seed(*parts) -> int:
    """A 63-bit seed from the parts (the run's seed, the round, a batch's place)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def sample(model, prompts: Sequence[List[int]], sampling: Sampling, *, pad_token_id: int,
           eos_token_id: Optional[int], seed: int, device: torch.device) -> List[List[List[int]]]:
    """K = sampling.num_generations responses (token ids, the end-of-sequence token and what follows
    it removed) for each of `prompts` (token ids), in one left-padded generate call."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    # top_k=0: no top-k cut, whatever the model's generation config says (the flags are temperature and top_p)
    options = dict(do_sample=True, max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.num_generations,
                   pad_token_id=pad_token_id, eos_token_id=eos_token_id, temperature=sampling.temperature,
                   top_p=sampling.top_p, top_k=0)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
    model.train(was_training)
    responses = []
    for row in output[:, width:].tolist():
        # generate pads a finished response after its end-of-sequence token
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id)]
        responses.append(row)
    k = sampling.num_generations
    return [responses[i * k:(i + 1) * k] for i in range(len(prompts))]
