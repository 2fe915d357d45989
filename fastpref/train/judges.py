"""Judges of generated responses: what ranks a prompt's K responses, and the pairs made of them.

``--judge`` takes one of three kinds, told apart by its form:

* a folder: a reward model (transformers' sequence classification, one logit per text), read with
  its own tokenizer and, where it has one, its chat template -- the policy's token ids never reach
  it, only text;
* ``module:function``: a reward function with TRL's convention, ``scores = fn(prompts=...,
  completions=...)`` (so ``def fn(completions, **kwargs)`` works too), one float per (prompt,
  completion), e.g. a verifiable reward (the module importable from the working directory);
* ``module:object`` where the object has TRL's pairwise-judge interface, ``judge(prompts,
  completions) -> [0 or 1 per prompt]`` for one pair of completions per prompt: a prompt's K
  responses meet in every pair, and a response scores its wins.

Every score is checked: a count that does not match, a NaN, an infinity or a value that is not a
number stops the round with an error naming the judge and the prompt, never a silently wrong pair.
"""
from __future__ import annotations

import importlib
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, List, Protocol, Sequence, Tuple

import torch

PAIR_SELECTIONS = ("best_worst", "margin")


class Judge(Protocol):
    """Scores the completions of each prompt: ``score(prompts, completions)`` with completions[i] the
    list of prompt i's completions; one list of floats per prompt, as long as its completions."""

    name: str

    def score(self, prompts: List[str], completions: List[List[str]]) -> List[List[float]]:
        ...


def flat(prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> Tuple[List[str], List[str]]:
    """Each completion with its prompt, in two flat lists."""
    return ([prompt for prompt, own in zip(prompts, completions) for _ in own],
            [completion for own in completions for completion in own])


def regrouped(scores: List[float], completions: Sequence[Sequence[str]]) -> List[List[float]]:
    """Flat scores cut back into one list per prompt, as long as its completions."""
    out, start = [], 0
    for own in completions:
        out.append(scores[start:start + len(own)])
        start += len(own)
    return out


def checked_scores(values, expected: int, judge: str, prompts: Sequence[str]) -> List[float]:
    """`values` as floats, or a ValueError that names `judge`, the bad value and its prompt."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"judge {judge} returned {type(values).__name__}, not a list of scores") from None
    if len(values) != expected:
        raise ValueError(f"judge {judge} returned {len(values)} scores for {expected} completions")
    scores = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"judge {judge} returned {value!r} (a {type(value).__name__}, not a number) for "
                             f"completion {index}, of prompt {prompts[index][:80]!r}")
        if not math.isfinite(value):
            raise ValueError(f"judge {judge} returned {value} for completion {index}, of prompt "
                             f"{prompts[index][:80]!r}: scores must be finite")
        scores.append(float(value))
    return scores


class RewardFunction:
    """TRL's reward-function convention: ``fn(prompts, completions)``, both flat, one score each."""

    def __init__(self, function: Callable, name: str):
        self.function, self.name = function, name

    def score(self, prompts, completions):
        flat_prompts, flat_completions = flat(prompts, completions)
        # by keyword, as TRL calls them: `def reward(completions, **kwargs)` works too
        scores = self.function(prompts=flat_prompts, completions=flat_completions)
        return regrouped(checked_scores(scores, len(flat_completions), self.name, flat_prompts), completions)


class PairwiseJudge:
    """A TRL pairwise judge: each of a prompt's responses meets every other once; its score is its wins."""

    def __init__(self, judge, name: str):
        self.judge, self.name = judge, name

    def score(self, prompts, completions):
        matches = [(p, i, j) for p, own in enumerate(completions) for i in range(len(own)) for j in range(i + 1, len(own))]
        wins = [[0.0] * len(own) for own in completions]
        if not matches:
            return wins
        winners = self.judge.judge([prompts[p] for p, _, _ in matches],
                                   [[completions[p][i], completions[p][j]] for p, i, j in matches])
        winners = checked_scores(winners, len(matches), self.name, [prompts[p] for p, _, _ in matches])
        for (p, i, j), winner in zip(matches, winners):
            if winner not in (0, 1, -1):
                raise ValueError(f"judge {self.name} returned {winner:g} for a pair of prompt {prompts[p][:80]!r}: "
                                 "a pairwise judge returns 0 (first better), 1 (second) or -1 (a tie)")
            if winner >= 0:
                wins[p][(i, j)[int(winner)]] += 1.0
        return wins


class RewardModel:
    """A sequence-classification reward model from a folder: logit 0 of each (prompt, completion) text,
    rendered with its own tokenizer's chat template where it has one."""

    def __init__(self, folder: str, device: torch.device, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.device, self.batch_size = folder, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def score(self, prompts, completions):
        flat_prompts, flat_completions = flat(prompts, completions)
        texts = [self.text(prompt, completion) for prompt, completion in zip(flat_prompts, flat_completions)]
        values = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, add_special_tokens=False).to(self.device)
            values.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        return regrouped(checked_scores(values, len(texts), self.name, flat_prompts), completions)


def load_judge(spec: str, device: torch.device) -> Judge:
    """The judge `spec` names (see the module's docstring); a ValueError naming --judge otherwise."""
    if not spec:
        raise ValueError("--judge is required with --rounds: a reward model folder, module:function (a reward "
                         "function) or module:object (a pairwise judge)")
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"--judge {spec} is a folder without a config.json: not a reward model")
        return RewardModel(spec, device)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"--judge {spec!r} is neither a folder nor module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the module may be a file of the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--judge {spec}: cannot import {module_name}: {error}") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise ValueError(f"--judge {spec}: module {module_name} has no attribute {attribute}")
    if callable(getattr(target, "judge", None)):
        return PairwiseJudge(target, spec)
    if callable(target):
        return RewardFunction(target, spec)
    raise ValueError(f"--judge {spec}: {attribute} is neither a function nor an object with a judge method")


def select_pairs(scores: Sequence[float], selection: str, margin: float) -> List[Tuple[int, int]]:
    """The (chosen, rejected) pairs of one prompt's scored responses: the best against the worst, or
    every pair whose scores differ by more than `margin`. Responses closer than that (ties) make none."""
    if selection == "best_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] - scores[worst] > margin else []
    if selection == "margin":
        return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] - scores[j] > margin]
    raise ValueError(f"pair_selection must be one of {', '.join(PAIR_SELECTIONS)}, got {selection!r}")
