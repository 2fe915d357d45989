"""A training run's settings, and the command-line flags generated from them.

:class:`TrainConfig` is the one source: each field carries its help text (and, where it has
them, its choices and older flag names) in its metadata, and :func:`add_config_arguments` turns the
fields into flags. A field's flag is its name, with dashes or with underscores (``--output-dir`` and
``--output_dir``, as TRL's ``HfArgumentParser`` accepts); where TRL has a setting, the field bears
TRL's name (``per_device_train_batch_size``, ``num_train_epochs``, ``learning_rate``, ...).
``--config FILE.yaml`` reads the same names from a file; flags on the command line win over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..loss_spec import ACCEPTED_LOSS_TYPES, canonical_loss_types
from ..loss_types import F_DIVERGENCE_TYPES
from .data import FORMATS, MALFORMED_POLICIES, TRUNCATION_MODES
from .judges import PAIR_SELECTIONS
from .named_models import NAMED_MODELS, check_model_argument

SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp", "tp")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The embedded default (no model given) trains a tiny random model: it needs a far larger
# learning rate than fine-tuning a pretrained one, and several passes over its sample.
EMBEDDED_PRESET = {"learning_rate": 2e-3, "num_train_epochs": 4, "pairs_per_step": 8, "beta": 0.1,
                   "max_length": 160, "max_prompt_length": 96, "eval_steps": 40}
REAL_MODEL_PRESET = {"learning_rate": 5e-7, "num_train_epochs": 1, "pairs_per_step": 8, "beta": 0.1,
                     "max_length": 1024, "max_prompt_length": 512, "eval_steps": 100}


def _option(default: Any, help: str, *, choices: Optional[Sequence] = None, aliases: Sequence[str] = (),
            default_factory=None) -> Any:
    """A field with its flag's help text, choices and older names (aliases, kept for old scripts)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of `fastpref train`. None means: the preset for the model (embedded or real)."""

    model: Optional[str] = _option(
        None, f"local folder of a transformers causal LM, or a packaged model by name: {', '.join(NAMED_MODELS)} "
        "(default: the embedded tiny Llama)", aliases=("--model-name-or-path", "--model_name_or_path"))
    reference_model: Optional[str] = _option(
        None, "local folder (or packaged name) of a separate frozen reference model (default: the policy's "
        "starting point, or its base model with LoRA)", aliases=("--ref-model", "--ref_model"))
    precompute_ref_log_probs: bool = _option(
        True, "compute the reference log-probs once, before training, and cache them on disk (false: compute "
        "them every step)")
    data: Optional[str] = _option(
        None, "local JSONL/Parquet file or saved dataset directory: pairs (prompt/chosen/rejected), or for kto "
        "also unpaired examples (prompt/completion/label) (default: the bundled HH-RLHF sample)")
    data_format: str = _option("auto", "how rows hold prompt and responses; auto: from the columns",
                               choices=("auto",) + FORMATS)
    split: Optional[str] = _option(None, "split of a saved DatasetDict (default: train)")
    output_dir: str = _option("fastpref-run", "where metrics, checkpoints and the model go")
    loss_type: Union[str, List[str]] = _option(
        "sigmoid", "one loss type, or several for a weighted sum (e.g. sigmoid sft); dpo is another name for "
        "sigmoid (TRL's name of DPO's loss), under which the run reports it", choices=ACCEPTED_LOSS_TYPES)
    loss_weights: Optional[List[float]] = _option(None, "one weight per loss type (default: 1 each)")
    beta: Optional[float] = _option(None, "inverse temperature")
    label_smoothing: float = _option(
        0.0, "assumed fraction of flipped preference labels (exo_pair, robust, aot, aot_unpaired, simpo)")
    desirable_weight: float = _option(1.0, "kto: weight of the desirable examples' losses (TRL's KTOConfig)")
    undesirable_weight: float = _option(1.0, "kto: weight of the undesirable examples' losses (TRL's KTOConfig)")
    simpo_gamma: float = _option(0.5, "SimPO's target reward margin")
    discopop_tau: float = _option(0.05, "DiscoPOP's temperature")
    f_divergence_type: str = _option("reverse_kl", "divergence of the log-ratios' scores (TRL's f-DPO)",
                                     choices=F_DIVERGENCE_TYPES)
    f_alpha_divergence_coef: float = _option(1.0, "alpha of f_divergence_type alpha_divergence")
    use_weighting: bool = _option(False, "WPO: weigh each pair's loss by its responses' probabilities under "
                                  "the policy")
    ld_alpha: Optional[float] = _option(None, "LD-DPO: weight in [0, 1] of the response tokens past the "
                                        "pair's shared length")
    average_logps: Optional[bool] = _option(
        None, "true/false: override each loss type's sum/mean reduction of the log-probs (default: the loss "
        "type's own)")
    learning_rate: Optional[float] = _option(None, "peak learning rate", aliases=("--lr",))
    weight_decay: float = _option(0.0, "AdamW weight decay")
    warmup_ratio: float = _option(0.1, "fraction of the steps with a linear warmup (ceil(ratio * steps) steps, "
                                  "as TRL)")
    warmup_steps: int = _option(0, "steps of linear warmup; > 0 overrides --warmup-ratio")
    lr_scheduler_type: str = _option("cosine", "learning-rate decay after the warmup", choices=SCHEDULES,
                                     aliases=("--lr-schedule",))
    num_train_epochs: Optional[float] = _option(None, "passes over the training pairs", aliases=("--epochs",))
    max_steps: Optional[int] = _option(None, "stop after this many optimizer steps (overrides --num-train-epochs)")
    per_device_train_batch_size: Optional[int] = _option(
        None, "pairs (kto: examples) per micro-batch on each process (TRL's batch size; or give --pairs-per-step)")
    pairs_per_step: Optional[int] = _option(
        None, "pairs (kto: examples) per micro-batch over all processes, split between them (the same run on any "
        "number of processes; or give --per-device-train-batch-size)")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step", aliases=("--grad-accum",))
    max_grad_norm: float = _option(1.0, "gradient clipping norm")
    seed: int = _option(0, "seed of the data order, split and initialisation")
    eval_fraction: float = _option(0.1, "fraction of the pairs held out (never trained on) for evaluation")
    eval_steps: Optional[int] = _option(None, "evaluate on the held-out pairs every N steps",
                                        aliases=("--eval-every",))
    logging_steps: int = _option(1, "write the training metrics every N steps (averaged over them)")
    score_train_pairs: int = _option(
        512, "at the end, score up to this many of the pairs the run trained on (0: none)")
    save_steps: int = _option(100, "checkpoint every N steps", aliases=("--save-every",))
    save_total_limit: int = _option(2, "checkpoints kept (older ones are deleted)", aliases=("--keep-checkpoints",))
    max_length: Optional[int] = _option(None, "longest prompt + response, in tokens")
    max_prompt_length: Optional[int] = _option(None, "longest prompt, in tokens")
    truncation_mode: str = _option("keep_end", "which end of an over-long prompt to keep", choices=TRUNCATION_MODES)
    on_malformed: str = _option(
        "skip", "skip (and report) rows that cannot be split into prompt and responses, or stop at them",
        choices=MALFORMED_POLICIES)
    prefix_sharing: bool = _option(False, "compute each prompt once for its chosen and rejected")
    group_by_prompt: bool = _option(
        False, "train the pairs of one prompt as one group: each distinct response computed once for every pair "
        "it is in (with --prefix-sharing, the prompt once for all of them); batches count groups")
    gradient_checkpointing: bool = _option(False, "recompute activations in the backward pass")
    lora_r: int = _option(0, "LoRA rank (0: full fine-tune; > 0 needs pip install 'fastpref[lora]')")
    lora_alpha: float = _option(16.0, "LoRA scaling numerator")
    lora_dropout: float = _option(0.0, "LoRA dropout")
    lora_target_modules: Optional[List[str]] = _option(
        None, "module names to adapt (default: attention and MLP projections)", aliases=("--lora-targets",))
    load_in_4bit: bool = _option(
        False, "QLoRA: load the model's decoder-layer projections in 4 bits (bitsandbytes) and train LoRA adapters "
        "on them; the embeddings, norms and LM head stay unquantized and frozen (needs --lora-r and "
        "pip install 'fastpref[qlora]')")
    load_in_8bit: bool = _option(
        False, "as --load-in-4bit, in 8 bits (LLM.int8())")
    bnb_4bit_quant_type: str = _option("nf4", "the 4-bit data type", choices=("nf4", "fp4"))
    use_bnb_nested_quant: bool = _option(
        False, "also quantize the 4-bit quantization constants (double quantization: about 0.4 bits per "
        "parameter less)")
    dtype: str = _option("auto", "model dtype; auto: bfloat16 on CUDA, float32 on the CPU", choices=DTYPES)
    bf16: bool = _option(False, "TRL's switch for --dtype bfloat16")
    fp16: bool = _option(False, "TRL's switch for --dtype float16")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    attn_implementation: str = _option("auto", "auto, sdpa, eager, flex_attention or flash_attention_2",
                                       aliases=("--attention",))
    cache_dir: Optional[str] = _option(
        None, "where reference log-probs and converted packaged models are cached (default: ~/.cache/fastpref)")
    tensorboard: bool = _option(False, "also log to OUTPUT_DIR/tensorboard")
    resume_from_checkpoint: str = _option(
        "auto", "auto (latest checkpoint in --output-dir), never, or a checkpoint path", aliases=("--resume",))
    backend: str = _option("auto", "fastpref backend: auto, triton, torch, cuda")
    gradients_in_forward: Optional[bool] = _option(
        None, "true/false: compute the loss's gradients in its forward, a group of pairs at a time (6NHV instead "
        "of 8NHV, group_rows x V float32 logits held; default: on a CPU only, see docs/losses.md)")
    group_rows: Optional[int] = _option(None, "response rows per group of gradients_in_forward (default: 256 on a "
                                              "CPU, 2,048 on a GPU)")
    parallel: str = _option(
        "ddp", "with several processes (torchrun): ddp replicates the model on every process; fsdp shards "
        "parameters, gradients and optimizer state over them (FSDP2); tp shards the LM head on the vocabulary "
        "(every process runs every batch)", choices=PARALLEL)
    progress: bool = _option(True, "progress bars (the run header, data report and warnings are shown either way)")
    # iterative DPO (docs/iterative.md): the policy writes, --judge ranks, each round trains on its pairs
    rounds: int = _option(0, "rounds of generate, judge, pair and train (0: train once on --data's pairs)")
    judge: Optional[str] = _option(
        None, "with --rounds: a reward model folder, module:function (a reward function, scores = fn(prompts, "
        "completions)) or module:object (a pairwise judge with TRL's judge method)")
    generations_per_prompt: int = _option(4, "responses sampled per prompt each round", aliases=("--num-generations",))
    prompts_per_round: int = _option(32, "prompts each round generates for (drawn in turn from --data's prompts)")
    heldout_prompts: int = _option(16, "prompts never trained on, answered and judged after every round")
    max_new_tokens: int = _option(64, "longest generated response, in tokens")
    temperature: float = _option(1.0, "sampling temperature (> 0)")
    top_p: float = _option(1.0, "nucleus sampling: the smallest set of tokens of at least this probability")
    generation_batch_size: int = _option(8, "prompts per generate call (and per judge call)")
    pair_selection: str = _option(
        "best_worst", "best_worst: the best response against the worst of each prompt; margin: every pair whose "
        "scores differ by more than --score-margin", choices=PAIR_SELECTIONS)
    score_margin: float = _option(0.0, "responses whose scores differ by this much or less make no pair (a tie)")
    round_reference: str = _option(
        "initial", "each round's reference: the starting model (initial) or the round's starting policy (previous)",
        choices=("initial", "previous"))

    def resolved(self, world_size: int = 1) -> "TrainConfig":
        """The presets filled in, TRL's switches and batch size turned into fastpref's, loss types under
        TRL's names, checked.
        `world_size`: the processes the run will have (for --per-device-train-batch-size)."""
        preset = EMBEDDED_PRESET if self.model is None else REAL_MODEL_PRESET
        filled = {k: (preset[k] if getattr(self, k) is None else getattr(self, k)) for k in preset}
        if self.per_device_train_batch_size is not None:
            if self.pairs_per_step is not None:
                raise ValueError("give pairs_per_step or per_device_train_batch_size, not both")
            if self.per_device_train_batch_size < 1:
                raise ValueError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
            filled["pairs_per_step"] = self.per_device_train_batch_size * world_size
        for switch, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
            if getattr(self, switch):
                if self.dtype not in ("auto", dtype) or (self.bf16 and self.fp16):
                    raise ValueError(f"{switch} asks for {dtype}, which contradicts dtype={self.dtype!r}"
                                     + (" and the other half-precision switch" if self.bf16 and self.fp16 else ""))
                filled["dtype"] = dtype
        types = canonical_loss_types(self.loss_type)
        filled["loss_type"] = types[0] if isinstance(self.loss_type, str) else list(types)
        cfg = dataclasses.replace(self, **filled)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            values = value if isinstance(value, list) else [value]
            if choices and value is not None and any(v not in choices for v in values):
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must lie in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.pairs_per_step >= 1, "pairs_per_step must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.num_train_epochs > 0, "num_train_epochs must be > 0"),
            (0 <= self.eval_fraction < 1, "eval_fraction must lie in [0, 1)"),
            (self.save_steps >= 1, "save_steps must be >= 1"),
            (self.eval_steps >= 1, "eval_steps must be >= 1"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.save_total_limit >= 1, "save_total_limit must be >= 1"),
            (self.score_train_pairs >= 0, "score_train_pairs must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0"),
            (self.lora_r >= 0, "lora_r must be >= 0"),
            (self.resume_from_checkpoint in ("auto", "never") or Path(self.resume_from_checkpoint).exists(),
             "resume_from_checkpoint must be 'auto', 'never' or an existing checkpoint directory, got "
             f"{self.resume_from_checkpoint!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("model", "reference_model"):
            if getattr(self, name) is not None:
                check_model_argument(getattr(self, name), flag(name))
        self._check_loss_options()
        if self.rounds == 0 and self.judge is not None:
            raise ValueError("judge ranks generated responses, which only --rounds makes")
        if self.lora_r > 0 and importlib.util.find_spec("peft") is None:
            raise ValueError("lora_r > 0 needs the peft package, which is not installed: "
                             "pip install 'fastpref[lora]' (or pip install peft)")
        self._check_quantization()

    def _check_quantization(self) -> None:
        bits = [name for name in ("load_in_4bit", "load_in_8bit") if getattr(self, name)]
        if len(bits) == 2:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: give one")
        if not bits:
            return
        if self.lora_r == 0:
            raise ValueError(f"{bits[0]} trains LoRA adapters on a frozen quantized model (QLoRA): give lora_r > 0 "
                             "(for example --lora-r 16)")
        if self.model is None:
            raise ValueError(f"{bits[0]} quantizes a model as it is loaded: give --model (a model folder or one "
                             f"of the names {', '.join(NAMED_MODELS)}); the embedded model is built, not loaded")
        if self.parallel in ("fsdp", "tp"):
            raise ValueError(f"{bits[0]} with parallel={self.parallel!r}: quantized weights are not sharded by "
                             "fastpref's FSDP2 or tensor parallelism; use --parallel ddp (each process holds "
                             "the quantized model)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{bits[0]} needs the bitsandbytes package, which is not installed: "
                             "pip install 'fastpref[qlora]' (or pip install bitsandbytes)")

    def _check_loss_options(self) -> None:
        """Options of one loss family given to the other: a mixed configuration is refused."""
        unpaired = self.loss_type == "kto" or self.loss_type == ["kto"]
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
            if value != 1.0 and not unpaired:
                raise ValueError(f"{name} weighs the examples of loss_type kto; loss_type {self.loss_type} "
                                 "has none")
        if unpaired and self.group_by_prompt:
            raise ValueError("group_by_prompt groups the pairs of a prompt; loss_type kto trains unpaired examples")
        if self.group_by_prompt and self.ld_alpha is not None:
            raise ValueError("ld_alpha weighs each response by its pair's shared length, which is not one number for "
                             "a response in several pairs: group_by_prompt trains without ld_alpha")
        if unpaired and self.label_smoothing != 0.0:
            raise ValueError("label_smoothing applies to the paired losses (sigmoid, robust, simpo), not to "
                             "loss_type kto")


# -------------------------------------------------------------------------------------- the flags

# `fastpref eval` takes these fields of a training run, under the same flags
EVAL_FIELDS = ("model", "reference_model", "data", "data_format", "split", "beta", "pairs_per_step", "max_length",
               "max_prompt_length", "truncation_mode", "on_malformed", "device", "dtype", "attn_implementation",
               "backend", "progress", "cache_dir")
# what eval needs to say or assume differently
EVAL_DEFAULTS = {"beta": 0.1, "pairs_per_step": 8, "max_length": 1024, "max_prompt_length": 512}
EVAL_HELP = {
    "model": "trained model folder (a LoRA adapter folder works too)",
    "reference_model": "reference model folder (default for an adapter: its base model)",
    "data": "preference file to score, e.g. OUTPUT_DIR/heldout.jsonl of a training run (default: the bundled "
            "HH-RLHF sample)",
    "beta": "inverse temperature of the implicit rewards",
    "pairs_per_step": "pairs per forward pass",
    "max_length": "longest prompt + response, in tokens: use the training run's value",
    "max_prompt_length": "longest prompt, in tokens: use the training run's value",
    "progress": "progress bar",
    "cache_dir": "where packaged models are converted (default: ~/.cache/fastpref)",
}


def flag(name: str) -> str:
    """A field's flag as messages name it."""
    return "--" + name.replace("_", "-")


def to_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _preset_default(name: str) -> Optional[str]:
    if name not in EMBEDDED_PRESET:
        return None
    return f"{EMBEDDED_PRESET[name]:g} for the embedded model, {REAL_MODEL_PRESET[name]:g} for a real one"


def _argument(name: str, hint: Any, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """argparse keywords for a field of type `hint`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:  # Optional[X], or loss_type's Union[str, List[str]]
        listed = [a for a in args if typing.get_origin(a) in (list, List)]
        hint = listed[0] if listed else next(a for a in args if a is not type(None))
    keywords: Dict[str, Any] = {"choices": metadata["choices"]}
    if typing.get_origin(hint) in (list, List):
        keywords.update(nargs="+", type=typing.get_args(hint)[0])
        if metadata["choices"]:
            keywords["metavar"] = name.upper().rsplit("_", 1)[-1]
    elif hint is bool:
        keywords.update(type=to_bool, metavar="{true,false}")
    else:
        keywords["type"] = hint
    return keywords


def add_config_arguments(parser: argparse.ArgumentParser, names: Optional[Sequence[str]] = None,
                         defaults: Optional[Dict[str, Any]] = None, helps: Optional[Dict[str, str]] = None) -> None:
    """One flag per TrainConfig field (only `names`, when given), with its help, choices and default;
    `defaults` and `helps` override a field's. A boolean flag alone
    means true (``--bf16``), or takes a value (``--bf16 false``); one that is on by default also has
    ``--no-NAME``."""
    hints = typing.get_type_hints(TrainConfig)
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        options = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        keywords = _argument(f.name, hints[f.name], f.metadata)
        default = defaults.get(f.name, f.default)
        text = helps.get(f.name, f.metadata["help"])
        preset = _preset_default(f.name)
        if preset and f.name not in defaults:
            text += f" (default: {preset})"
        if hints[f.name] is bool:
            keywords.update(nargs="?", const=True)
        if keywords.get("metavar") and f.metadata["choices"]:
            text += f"; one of {', '.join(f.metadata['choices'])}"
        parser.add_argument(*options, *f.metadata["aliases"], dest=f.name, default=default, help=text, **keywords)
        if hints[f.name] is bool and default is True:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", f"--no_{f.name}", dest=f.name,
                                action="store_false", help=f"the opposite of {options[0]}")


def _from_file(kind, item):
    """A YAML value as the flag's type would read it; a float where an int belongs is an error."""
    if item is None:
        return None
    if kind is to_bool:
        return item if isinstance(item, bool) else to_bool(item)
    if isinstance(item, bool) or (kind is int and isinstance(item, float)):
        raise ValueError(f"expected {kind.__name__}, got {item!r}")
    return kind(item)


def read_config_file(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The settings of a YAML file (field names, with underscores or dashes), checked and converted
    as the parser would the same flags, by destination."""
    import yaml

    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"--config {path}: cannot read it: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value, got a {type(loaded).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None:
            raise ValueError(f"--config {path}: unknown setting {key!r} (the settings are the flags' names "
                             f"without '--', e.g. output_dir)")
        if action.nargs == "+" and not isinstance(value, list):
            value = [value]
        if action.type is not None:
            try:
                value = ([_from_file(action.type, item) for item in value] if isinstance(value, list)
                         else _from_file(action.type, value))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
                raise ValueError(f"--config {path}: {key}: {error}") from None
        if action.choices and any(i not in action.choices for i in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, "
                             f"got {value!r}")
        values[name] = value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    types = values.get("loss_type")
    if isinstance(types, list):
        values["loss_type"] = types[0] if len(types) == 1 else types
    return TrainConfig(**values)
