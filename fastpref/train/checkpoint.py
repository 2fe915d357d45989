"""Checkpoints that resume exactly, or are refused.

A checkpoint is a directory of torch-saved parts (model, optimizer, scheduler, RNG states,
progress) plus manifest.json listing each file's SHA-256. It is written under a temporary name
and renamed into place only when complete, so an interrupted save never looks like a checkpoint;
loading re-hashes every file and refuses a missing, partial or altered one with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: incomplete, corrupt, or of another run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_directory(directory: Path) -> Path:
    """Where a checkpoint is written before `seal` renames it into place."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".partial")


def seal(staging: Path, directory: Path, meta: Dict[str, Any]) -> Path:
    """Hash every file under `staging` into its manifest (with `meta`), then rename it to `directory`."""
    files = {path.relative_to(staging).as_posix(): _sha256(path)
             for path in sorted(staging.rglob("*")) if path.is_file()}
    manifest = {"format": FORMAT_VERSION, "files": files, "meta": meta}
    with open(staging / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory


def save_checkpoint(directory: Path, parts: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Write `parts` (name -> picklable object) and `meta` (JSON) atomically into `directory`."""
    staging = staging_directory(directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, value in parts.items():
        torch.save(value, staging / f"{name}.pt")
    return seal(staging, Path(directory), meta)


def verified_manifest(directory: Path) -> Dict[str, Any]:
    """The manifest of a checkpoint whose files are all there and match their checksums;
    CheckpointError if it is not whole."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: the checkpoint is incomplete (interrupted while saving?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format {manifest.get('format')}, "
                              f"this version reads {FORMAT_VERSION}")
    for filename, expected in files.items():
        path = directory / filename
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {filename}")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {filename} does not match its checksum")
    manifest.setdefault("meta", {})
    return manifest


def load_checkpoint(directory: Path, map_location="cpu", manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The parts of a verified checkpoint, plus its "meta"; CheckpointError if it is not whole.
    `manifest`: the checkpoint's, verified already."""
    manifest = manifest or verified_manifest(directory)
    loaded: Dict[str, Any] = {"meta": manifest["meta"]}
    for filename in manifest["files"]:
        path = Path(directory) / filename
        loaded[path.stem] = torch.load(path, map_location=map_location, weights_only=False)
    return loaded


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Checkpoint directories under output_dir, oldest first; saves still being staged are skipped."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint; load_checkpoint refuses it if it is not whole, rather than silently
    falling back to an older one."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None
