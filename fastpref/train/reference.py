"""Reference log-probs: computed once, cached on disk, reused across runs.

The reference model's summed response log-probs depend only on the reference weights and on
the tokenized pairs, so they are computed in one no-grad pass over the data (with a progress
bar) and stored under a key that hashes both: a different model, data set, tokenizer or
truncation gives a different file, never a stale hit. The file is written atomically.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..causal_lm import causal_lm_parts
from ..linear_logprobs import linear_logprobs
from ..losses import sequence_logps
from ..transfer import to_device
from .model import FusedHeadForward
from .packing import pack_pairs

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    root = os.environ.get("FASTPREF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastpref")
    return Path(root)


def cache_key(model_fingerprint: str, data_fingerprint: str, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for part in (CACHE_VERSION, model_fingerprint, data_fingerprint, str(dtype)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@torch.no_grad()
def pair_logps(model, pairs: Sequence, attention: str, device, *,
               prefix_sharing: bool, backend: str = "auto") -> torch.Tensor:
    """[2P] summed response log-probs in layout order (chosen_0, rejected_0, chosen_1, ...).

    `model`: a causal LM, or a :class:`FusedHeadForward` around one (sharded by FSDP2 or not).
    """
    packed = pack_pairs(pairs, prefix_sharing=prefix_sharing).to(device)
    if not isinstance(model, FusedHeadForward):
        model = FusedHeadForward(model)
    transform = causal_lm_parts(model.model).transform

    def logps(hidden, weight, bias):
        token_logp = linear_logprobs(hidden, weight, packed.targets, bias=bias, backend=backend,
                                     num_kept=packed.layout.num_response_tokens, **asdict(transform))
        return sequence_logps(token_logp, packed.layout).float()

    return model(packed, attention, logps)


class ReferenceCache:
    """Reference log-probs of every pair, by source row: (chosen, rejected)."""

    def __init__(self, values: Dict[int, torch.Tensor], key: str, path: Optional[Path] = None):
        self.values, self.key, self.path = values, key, path

    def lookup(self, rows: Sequence[int], device) -> torch.Tensor:
        """[2P] in layout order, for the pairs of `rows`."""
        return to_device(torch.cat([self.values[row] for row in rows]), device)

    @classmethod
    def load_or_compute(cls, key: str, pairs: Sequence, compute: Callable[[Sequence], torch.Tensor], *,
                        cache_dir: Optional[Path], batch_pairs: int, progress: bool = True,
                        write: bool = True) -> "ReferenceCache":
        """The cached values if `cache_dir` holds them for every pair, else `compute`d batch by batch
        (and stored there when `write`: with several processes, only one writes)."""
        path = None if cache_dir is None else Path(cache_dir) / f"reference-logps-{key[:24]}.pt"
        if path is not None and path.is_file():
            stored = torch.load(path, weights_only=True)
            rows = {pair.row for pair in pairs}
            if stored.get("key") == key and rows <= set(stored["rows"].tolist()):
                values = {int(r): v for r, v in zip(stored["rows"], stored["logps"])}
                return cls(values, key, path)
        values: Dict[int, torch.Tensor] = {}
        batches = range(0, len(pairs), batch_pairs)
        for start in tqdm(batches, desc="reference log-probs", unit="batch", disable=not progress):
            batch = pairs[start:start + batch_pairs]
            logps = compute(batch).cpu()
            for i, pair in enumerate(batch):
                values[pair.row] = logps[2 * i:2 * i + 2].clone()
        if path is not None and write:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = sorted(values)
            staging = path.with_suffix(".partial")
            torch.save({"key": key, "rows": torch.tensor(rows),
                        "logps": torch.stack([values[r] for r in rows])}, staging)
            os.replace(staging, path)
        return cls(values, key, path)
