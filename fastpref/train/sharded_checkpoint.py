"""Sharded checkpoints of an FSDP2 run (``torch.distributed.checkpoint``), verified like whole ones.

A checkpoint directory holds:

- ``model-optimizer/``: the model's (a LoRA run: the adapter's) and the optimizer's state, as
  ``torch.distributed.checkpoint`` writes them: each process its own shards, plus ``.metadata``;
- ``trainer.pt``: the learning-rate schedule and the progress (step; the data position follows
  from it), written by rank 0;
- ``rng-<rank>.pt``: every process's random-number state;
- ``manifest.json``: every file's SHA-256 and the run identity (see checkpoint.py).

All processes write into one staged directory (a file system they all see); rank 0 then hashes
every file and renames the directory into place, so an interrupted save never looks like a
checkpoint. Loading: rank 0 checks manifest and checksums and every process gets its verdict
before any reads a byte of state.

Another world size (one process included): ``torch.distributed.checkpoint`` reshards the model
and optimizer state to the new layout, exactly; the schedule and the data position are global.
The random-number streams are per process and do not carry over (a process without a saved one
keeps its seeded state); only dropout draws from them, so with no dropout (the default) a resumed
run equals the uninterrupted one up to the rounding of a different reduction order.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict

import torch

from .checkpoint import CheckpointError, rng_state, seal, set_rng_state, staging_directory, verified_manifest
from .distributed import Distributed

STATE = "model-optimizer"
TRAINER = "trainer.pt"


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def is_sharded(manifest: Dict[str, Any]) -> bool:
    return any(name.startswith(STATE + "/") for name in manifest["files"])


def _state_dicts(model, optimizer, trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))


def save_sharded(directory: Path, model, optimizer, trainer_state: Dict[str, Any], meta: Dict[str, Any],
                 distributed: Distributed, *, trainable_only: bool) -> Path:
    """Every process calls this; see the module documentation."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    staging = staging_directory(directory)
    if distributed.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    model_state, optimizer_state = _state_dicts(model, optimizer, trainable_only)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging / STATE))
    torch.save(rng_state(), staging / _rng_file(distributed.rank))
    if distributed.is_main:
        torch.save(trainer_state, staging / TRAINER)
    distributed.barrier()
    if distributed.is_main:
        seal(staging, directory, meta)
    distributed.barrier()
    return directory


def verified_on_main(directory: Path, distributed: Distributed) -> Dict[str, Any]:
    """`verified_manifest`, checked by rank 0 alone; every process raises its CheckpointError."""
    verdict: Any = None
    if distributed.is_main:
        try:
            verdict = verified_manifest(directory)
        except CheckpointError as error:
            verdict = error
    verdict = distributed.broadcast_object(verdict)
    if isinstance(verdict, CheckpointError):
        raise CheckpointError(str(verdict))
    return verdict


def load_sharded(directory: Path, model, optimizer, distributed: Distributed, *,
                 trainable_only: bool) -> Dict[str, Any]:
    """Load a verified sharded checkpoint into `model` and `optimizer` (any world size, any
    wrapping: FSDP2, DDP or none); returns the trainer state written by `save_sharded`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    directory = Path(directory)
    model_state, optimizer_state = _state_dicts(model, optimizer, trainable_only)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / STATE))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   # the frozen base of a LoRA run is not in the checkpoint; dcp.load has already
                   # refused a checkpoint without every key asked for
                   options=StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only))
    rng = directory / _rng_file(distributed.rank)
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return torch.load(directory / TRAINER, weights_only=False)
