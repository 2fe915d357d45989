"""`fastpref eval`: score a preference file with a trained policy and its reference.

For every pair, the implicit rewards r = beta (log pi(y|x) - log pi_ref(y|x)) of the chosen and
rejected responses, their margin and whether the chosen one wins; then the summary (reward
accuracy, mean margin). Log-probs come from the same fused op as training: no full logits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from . import data as data_module
from .model import adapters_disabled
from .named_models import resolve_model
from .quiet import peft_internals_quiet
from .reference import default_cache_dir, pair_logps


def _load(model_path: Path, reference_path: Optional[Path], device, dtype, attention):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        with peft_internals_quiet():
            policy = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    else:
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    reference = None
    if reference_path is not None:
        reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=dtype, local_files_only=True)
        reference.set_attn_implementation(attention)
        reference.to(device).eval()
    elif not hasattr(policy, "disable_adapter"):
        raise ValueError("evaluation needs a reference: pass a reference model, or a LoRA adapter "
                         "directory (its base model is then the reference)")
    policy.set_attn_implementation(attention)
    policy.to(device).eval()
    return policy, tokenizer, reference


def evaluate_pairs(model: str, data: Optional[str], *, reference_model: Optional[str] = None, beta: float = 0.1,
                   output: Optional[str] = None, pairs_per_step: int = 8, max_length: int = 1024,
                   max_prompt_length: int = 512, truncation_mode: str = "keep_end", data_format: str = "auto",
                   split: Optional[str] = None, on_malformed: str = "skip", device: str = "auto",
                   dtype: str = "auto", attention: str = "auto", backend: str = "auto",
                   progress: bool = True, cache_dir: Optional[str] = None) -> Dict:
    """The implicit rewards of every pair of `data` (see the module docstring), summed up; `cache_dir`:
    where packaged models (smollm2-135m, ...) are converted (default: fastpref's cache)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    device_ = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
    dtype_ = (torch.bfloat16 if device_.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    attention_ = attention if attention != "auto" else ("sdpa" if device_.type == "cpu" else "flex_attention")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    model = resolve_model(model, cache_root, progress=progress)
    if reference_model is not None:
        reference_model = resolve_model(reference_model, cache_root, flag="--reference-model", progress=progress)
    policy, tokenizer, reference = _load(Path(model), Path(reference_model) if reference_model else None,
                                         device_, dtype_, attention_)
    rows = data_module.load_rows(data, split=split)
    pairs, report = data_module.tokenize_pairs(
        rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, on_malformed=on_malformed, format=data_format)
    if not pairs:
        raise ValueError("no usable preference pairs in the data:\n" + report.summary())

    records = []
    for start in tqdm(range(0, len(pairs), pairs_per_step), desc="eval", unit="batch", disable=not progress):
        batch = pairs[start:start + pairs_per_step]
        policy_logps = pair_logps(policy, batch, attention_, device_, prefix_sharing=False,
                                  backend=backend)
        if reference is not None:
            reference_logps = pair_logps(reference, batch, attention_, device_,
                                         prefix_sharing=False, backend=backend)
        else:
            with adapters_disabled(policy):
                reference_logps = pair_logps(policy, batch, attention_, device_,
                                             prefix_sharing=False, backend=backend)
        rewards = beta * (policy_logps - reference_logps)
        for i, pair in enumerate(batch):
            chosen, rejected = float(rewards[2 * i]), float(rewards[2 * i + 1])
            records.append({
                "row": pair.row,
                "logps/chosen": float(policy_logps[2 * i]), "logps/rejected": float(policy_logps[2 * i + 1]),
                "ref_logps/chosen": float(reference_logps[2 * i]),
                "ref_logps/rejected": float(reference_logps[2 * i + 1]),
                "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected, "correct": chosen > rejected,
            })
    count = len(records)
    summary = {
        "pairs": count,
        "rewards/accuracies": sum(r["correct"] for r in records) / count,
        "rewards/margins": sum(r["rewards/margins"] for r in records) / count,
        "rewards/chosen": sum(r["rewards/chosen"] for r in records) / count,
        "rewards/rejected": sum(r["rewards/rejected"] for r in records) / count,
        "beta": beta, "data": report.to_dict(),
    }
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    return summary
