"""Reference log-probs: computed once, cached on disk, reused across runs.

The reference model's summed response log-probs depend only on the reference weights and on
the tokenized pairs, so they are computed in one no-grad pass (with a progress bar and an ETA)
and stored under a key that hashes both: a different model, data set, tokenizer or truncation
gives a different directory, never a stale hit. Only the pairs a run needs are computed, and the
directory is written in pieces as the pass goes (each piece atomically), so an interrupted pass,
or a later run that needs more pairs, computes only the pairs no piece holds yet.

Each pair keeps the log-probs of its chosen and its rejected response under its source row; a
prompt group (:class:`~fastpref.train.data.TokenizedGroup`) those of its responses, in order, under
its first row. For unpaired examples (KTO) the two values cached per example are the log-probs of
its completion and of its KL completion (see ``TokenizedCompletion.with_kl_completion``), under its
key.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..causal_lm import causal_lm_parts
from ..linear_logprobs import linear_logprobs
from ..losses import PreferenceLoss, sequence_logps
from ..transfer import to_device
from .model import FusedHeadForward
from .packing import PackedPairs, pack_pairs

CACHE_VERSION = "2"
# a piece of the cache is written at least this often while the pass runs (seconds)
PIECE_SECONDS = 30.0


def default_cache_dir() -> Path:
    root = os.environ.get("FASTPREF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastpref")
    return Path(root)


def cache_key(model_fingerprint: str, data_fingerprint: str, dtype: torch.dtype,
              ld_alpha: Optional[float] = None) -> str:
    """The key of a reference pass: model weights, data, dtype, and LD-DPO's weighting of the sums."""
    digest = hashlib.sha256()
    parts = (CACHE_VERSION, model_fingerprint, data_fingerprint, str(dtype))
    for part in parts + (() if ld_alpha is None else (f"ld_alpha={ld_alpha!r}",)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@torch.no_grad()
def packed_logps(model, packed: PackedPairs, attention: str, device, *, backend: str = "auto",
                 scored_as: Optional[PreferenceLoss] = None, trainable_head: bool = False) -> torch.Tensor:
    """[S] summed response log-probs of the packed sequences, in layout order.

    `model`: a causal LM, or a :class:`FusedHeadForward` around one (sharded by FSDP2 or not).
    `scored_as`: the loss whose policy pass these log-probs must equal bit for bit where the
    weights are the same (a reference pass): computed by its
    :meth:`~fastpref.PreferenceLoss.sequence_logps`, whose path depends on whether the policy's head
    is trained (`trainable_head`). None: by the op on `backend`.
    """
    packed = packed.to(device)
    if not isinstance(model, FusedHeadForward):
        model = FusedHeadForward(model)
    transform = causal_lm_parts(model.model).transform

    def logps(hidden, weight, bias):
        if scored_as is not None:
            return scored_as.sequence_logps(hidden, weight, packed.targets, packed.layout, bias=bias,
                                            trainable_head=trainable_head).float()
        token_logp = linear_logprobs(hidden, weight, packed.targets, bias=bias, backend=backend,
                                     num_kept=packed.layout.num_response_tokens, **asdict(transform))
        return sequence_logps(token_logp, packed.layout).float()

    return model(packed, attention, logps)


def pair_logps(model, pairs: Sequence, attention: str, device, *, prefix_sharing: bool, backend: str = "auto",
               scored_as: Optional[PreferenceLoss] = None, trainable_head: bool = False) -> torch.Tensor:
    """[S] summed response log-probs in layout order (chosen_0, rejected_0, chosen_1, ... for pairs;
    each group's responses in order), as :func:`packed_logps`."""
    return packed_logps(model, pack_pairs(pairs, prefix_sharing=prefix_sharing), attention, device, backend=backend,
                        scored_as=scored_as, trainable_head=trainable_head)


class ReferenceCache:
    """Reference log-probs of pairs by source row, (chosen, rejected); of groups, their responses'."""

    def __init__(self, values: Dict[int, torch.Tensor], key: str, directory: Optional[Path] = None):
        self.values, self.key, self.directory = values, key, directory

    def lookup(self, rows: Sequence[int], device) -> torch.Tensor:
        """[S] in layout order, for the pairs (or groups) of `rows`."""
        return to_device(torch.cat([self.values[row] for row in rows]), device)

    @staticmethod
    def directory_for(cache_dir: Path, key: str) -> Path:
        return Path(cache_dir) / f"reference-logps-{key[:24]}"

    @staticmethod
    def stored(directory: Optional[Path], key: str) -> Dict[int, torch.Tensor]:
        """Every row the pieces under `directory` hold for `key`."""
        values: Dict[int, torch.Tensor] = {}
        if directory is None or not directory.is_dir():
            return values
        for piece in sorted(directory.glob("piece-*.pt")):
            stored = torch.load(piece, weights_only=True)
            if stored.get("key") == key:
                logps = stored["logps"].split(stored["counts"].tolist())
                values.update((int(r), v) for r, v in zip(stored["rows"], logps))
        return values

    @staticmethod
    def write_piece(directory: Path, key: str, values: Dict[int, torch.Tensor]) -> None:
        """`values` as one more piece, renamed into place whole."""
        directory.mkdir(parents=True, exist_ok=True)
        rows = sorted(values)
        name = f"piece-{time.time_ns()}-{os.getpid()}.pt"
        staging = directory / (name + ".partial")
        torch.save({"key": key, "rows": torch.tensor(rows), "counts": torch.tensor([values[r].numel() for r in rows]),
                    "logps": torch.cat([values[r] for r in rows])}, staging)
        os.replace(staging, directory / name)

    @classmethod
    def load_or_compute(cls, key: str, pairs: Sequence, compute: Callable[[Sequence], torch.Tensor], *,
                        cache_dir: Optional[Path], batch_pairs: int, progress: bool = True,
                        stored: Optional[Dict[int, torch.Tensor]] = None, write: bool = True,
                        stop_requested: Callable[[], bool] = lambda: False, unit: str = "pair") -> "ReferenceCache":
        """The values of `pairs`: those `cache_dir` holds (`stored`, when the caller read them already),
        and the others `compute`d batch by batch, written there in pieces when `write` (with several
        processes, only one writes). `stop_requested` is asked after every batch; when it says so, what
        was computed is written and the pass ends early, with the values it has. The progress bar
        counts `unit`s, and shows only when there is something to compute."""
        directory = None if cache_dir is None else cls.directory_for(cache_dir, key)
        values = cls.stored(directory, key) if stored is None else dict(stored)
        missing = [pair for pair in pairs if pair.row not in values]
        unwritten: Dict[int, torch.Tensor] = {}
        last_write = time.monotonic()

        def flush():
            nonlocal last_write
            if unwritten and directory is not None and write:
                cls.write_piece(directory, key, unwritten)
            unwritten.clear()
            last_write = time.monotonic()

        with tqdm(total=len(missing), desc="reference log-probs", unit=unit,
                  disable=not (progress and missing)) as bar:
            for start in range(0, len(missing), batch_pairs):
                batch = missing[start:start + batch_pairs]
                logps = compute(batch).cpu().split([len(item.responses) for item in batch])
                for item, item_logps in zip(batch, logps):
                    values[item.row] = unwritten[item.row] = item_logps.clone()
                bar.update(len(batch))
                if time.monotonic() - last_write >= PIECE_SECONDS:
                    flush()
                if stop_requested():
                    break
        flush()
        return cls(values, key, directory)

    def complete_for(self, pairs: Sequence) -> bool:
        return all(pair.row in self.values for pair in pairs)
