"""What one process will hold: reported by the trainer before the first step, and planned before
any work by ``fastpref plan --memory`` from a model's config and the data's lengths.

Per process: the parameters, gradients and AdamW state it keeps (under FSDP2 or ZeRO-3 its
shards, plus the whole weights of one decoder layer and of the layers outside them while they
run, in the compute dtype); the reference; and, per micro-batch, the activations the backward
keeps and the fused loss head's own memory.

Activations, per token and decoder layer of a Llama-style layer (H hidden, I MLP width, c bytes of
the compute dtype): 11 H + 4 I values, c bytes each: each RMSNorm's input, normalised value and
output (3 H, twice), q, k and v as attention takes them (3 H), the attention's output and its
contiguous copy for the output projection (2 H), the MLP's gate, activation, up projection and
product (4 I). Under LoRA the norms' weights are frozen and their normalised values are not kept:
9 H + 4 I. Attention that stores no [T x T] matrix (flash, flex, and
sdpa's flash kernels, also on the CPU) adds only the dense [T x T] mask that sdpa and eager take
(eager also keeps each layer's attention probabilities, heads x T x T). With gradient
checkpointing, one H-vector per token and layer is kept, and the backward recomputes one layer's
set at a time.

The peak of a step is the static memory (weights, optimizer state) plus the largest of three
moments: the end of the forward (every activation, the loss head's, and the head's weight gradient
the backward computes first), the backward (gradients grow as activations are freed: every
gradient at its end, with a tied embedding's own dense gradient before it is added in; with
checkpointing, the larger of the kept inputs and the gradients, and one recomputed layer), and the
optimizer step (every gradient and AdamW's temporaries: with foreach, the GPU default, a copy of
the trainable parameters; on the CPU, two copies of the largest). Gradients are freed at the
start of a step (``zero_grad(set_to_none=True)``), so the end of the forward holds none.

Measured on the CPU against peak RSS (``benchmarks/bench_memory_plan.py``, SmolLM2-135M and
Gemma-3-270m, full, LoRA and QLoRA, with and without checkpointing): see
``benchmarks/results/cpu-memory-plan.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from ..backends.scratch import DEFAULT_SCRATCH_BYTES
from ..causal_lm import decoder_layer_modules, unwrap
from .wording import count_of

MIB = 1 << 20
GIB = 1 << 30
# how the base weights are held: trained (full), frozen with LoRA adapters, or quantized with them (QLoRA)
ADAPTATIONS = ("full", "lora", "qlora-4bit", "qlora-8bit")
# what the processes share out: nothing (one process, DDP); the gradients and optimizer state
# (DeepSpeed ZeRO-2); also the parameters (ZeRO-3, FSDP2)
SHARDINGS = ("none", "zero2", "zero3")
# attention implementations that take a dense [T x T] mask of the packed batch
DENSE_MASK_ATTENTION = ("sdpa", "eager")


def _quantization_constants(tensor: torch.Tensor) -> List[torch.Tensor]:
    """bitsandbytes' constants of a quantized weight: a 4-bit weight's per-block scales (and, with
    double quantization, their own), an 8-bit weight's per-row scales; none for other tensors."""
    state = getattr(tensor, "quant_state", None)
    constants = [getattr(tensor, "SCB", None)]
    while state is not None:
        constants += [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
        state = getattr(state, "state2", None)
    return [constant for constant in constants if constant is not None]


def stored_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors as this process stores them (a DTensor: its own shard; a quantized
    weight: its packed values and constants)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
        total += sum(constant.numel() * constant.element_size() for constant in _quantization_constants(tensor))
    return total


def _is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ in ("Params4bit", "Int8Params")


def _full_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a DTensor's numel is the whole tensor's


def _mib(size: float) -> str:
    return f"{size / MIB:,.1f} MiB"


def packed_tokens(item, prefix_sharing: bool) -> int:
    """Tokens a pair or group (or an unpaired example) puts in a packed forward."""
    prompt = len(item.prompt_ids)
    if not hasattr(item, "responses"):  # an unpaired example
        return prompt + len(item.completion_ids)
    return scored_tokens(item) + (prompt if prefix_sharing else len(item.responses) * prompt)


def scored_tokens(item) -> int:
    """Response tokens of a pair or group, or of an unpaired example."""
    if not hasattr(item, "responses"):
        return len(item.completion_ids)
    return sum(len(response) for response in item.responses)


def longest_micro_batch(items, size: int, prefix_sharing: bool):
    """(tokens, scored tokens) of the `size` items that put the most tokens in a packed forward:
    the largest micro-batch of that many the data can give."""
    longest = sorted(items, key=lambda item: packed_tokens(item, prefix_sharing))[-size:]
    return sum(packed_tokens(item, prefix_sharing) for item in longest), sum(scored_tokens(item) for item in longest)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory estimate reads off a causal LM."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    parameters: int  # every parameter once (a tied LM head and embedding are one)
    projections: int  # weights of the decoder layers' Linear layers: what LoRA adapts and QLoRA quantizes
    projection_matrices: int
    projection_rows: int  # their output features (8-bit keeps a float32 scale per row)
    lora_per_rank: int  # the sum of their in + out features: adapter parameters per unit of LoRA rank
    largest_layer: int  # parameters of the largest decoder layer
    largest_parameter: int
    tied: bool  # the LM head's weight is the input embedding's

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The shape of an (unquantized) causal LM, which may live on the meta device. A model that
        names no decoder-layer class (``_no_split_modules``) counts every Linear but the LM head as
        a projection, and its config's layers as equal shares of what is outside the embeddings and
        the head."""
        lm = unwrap(model)
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        head = lm.get_output_embeddings()
        layers = decoder_layer_modules(lm)
        within = [module for layer in layers for module in layer.modules()] if layers else list(lm.modules())
        linears = [module for module in within if isinstance(module, torch.nn.Linear) and module is not head]
        parameters = list({id(p): p for p in lm.parameters()}.values())
        outside = {id(p): p for module in (head, lm.get_input_embeddings()) for p in module.parameters()}
        largest_layer = (max(sum(p.numel() for p in layer.parameters()) for layer in layers) if layers else
                         sum(p.numel() for p in parameters if id(p) not in outside) // config.num_hidden_layers)
        return cls(hidden=config.hidden_size, layers=len(layers) or config.num_hidden_layers,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
                   heads=config.num_attention_heads, vocab=head.weight.shape[0],
                   parameters=sum(p.numel() for p in parameters),
                   projections=sum(m.weight.numel() for m in linears), projection_matrices=len(linears),
                   projection_rows=sum(m.out_features for m in linears),
                   lora_per_rank=sum(m.in_features + m.out_features for m in linears),
                   largest_layer=largest_layer, largest_parameter=max(p.numel() for p in parameters),
                   tied=head.weight is lm.get_input_embeddings().weight)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """The shape of the model `config` describes, built on the meta device (no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.of(model)


@dataclass(frozen=True)
class MemorySetting:
    """How a run holds and computes the model (see ADAPTATIONS, SHARDINGS)."""

    adaptation: str = "full"
    gradient_checkpointing: bool = False
    sharding: str = "none"
    processes: int = 1
    lora_r: int = 16
    compute_bytes: int = 2  # bytes per value of the compute dtype (2: bfloat16)
    device_type: str = "cuda"
    attention: str = "flash_attention_2"
    nested_quantization: bool = False

    def __post_init__(self):
        for name, allowed in (("adaptation", ADAPTATIONS), ("sharding", SHARDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.processes < 1 or (self.sharding != "none" and self.processes < 2):
            raise ValueError(f"sharding {self.sharding!r} over {self.processes} processes: give at least 2 to shard")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process holds (see the module documentation for each term)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int  # at the end of the forward, the attention mask included
    loss_head: int  # the fused loss head's per-token state and scratch
    head_gradient: int  # the LM-head weight's gradient, computed first in the backward (a trained head)
    recomputed_layer: int  # with gradient checkpointing, the activations of the layer the backward recomputes
    embedding_gradient: int  # a tied embedding's own dense gradient, before it is added to the head's
    step_temporaries: int  # AdamW's, during the optimizer step

    @property
    def moments(self) -> dict:
        """What is held beyond the weights and optimizer state at the end of the forward, in the
        backward and during the optimizer step. In the backward, gradients grow as activations are
        freed; with checkpointing the recomputed layer comes on top of whichever is larger."""
        kept = self.activations if self.recomputed_layer else 0
        return {"forward": self.activations + self.loss_head + self.head_gradient,
                "backward": max(self.gradients, kept) + self.recomputed_layer + self.embedding_gradient,
                "optimizer step": self.gradients + self.step_temporaries}

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer_state + max(self.moments.values())


def _quantized_weight_bytes(shape: ModelShape, setting: MemorySetting) -> float:
    """The quantized projections with their constants: 4-bit, half a byte per weight, a float32
    scale per block of 64 and the 16-value code of each matrix (with nested quantization, an 8-bit
    scale per block instead, a float32 per 256 of those, their 256-value code and an offset);
    8-bit, a byte per weight and a float32 scale per row."""
    if setting.adaptation == "qlora-8bit":
        return shape.projections + 4 * shape.projection_rows
    blocks = shape.projections / 64
    if setting.nested_quantization:
        return shape.projections / 2 + blocks + blocks / 256 * 4 + (64 + 1024 + 4) * shape.projection_matrices
    return shape.projections / 2 + blocks * 4 + 64 * shape.projection_matrices


def estimate_memory(shape: ModelShape, setting: MemorySetting, *, tokens: int, scored_tokens: int) -> MemoryEstimate:
    """What one process holds for a micro-batch of `tokens` packed tokens of which `scored_tokens`
    are response tokens (see the module documentation)."""
    c, n = setting.compute_bytes, setting.processes
    full = setting.adaptation == "full"
    sharded_states = n if setting.sharding != "none" else 1  # gradients and optimizer state
    adapters = 0 if full else setting.lora_r * shape.lora_per_rank  # float32, as PEFT keeps them
    # the base weights in the compute dtype; under ZeRO-3 this process's shard, plus one decoder layer
    # and the layers outside them (embeddings, norm, LM head) gathered while they run
    if setting.adaptation.startswith("qlora"):
        # PEFT's k-bit preparation keeps every unquantized weight in float32
        weights = _quantized_weight_bytes(shape, setting) + 4 * (shape.parameters - shape.projections)
    elif setting.sharding == "zero3":
        outside_layers = shape.parameters - shape.layers * shape.largest_layer
        weights = shape.parameters * c / n + (shape.largest_layer + max(outside_layers, 0)) * c
    else:
        weights = shape.parameters * c
    weights += 4 * adapters
    if full:
        # fastpref's own runs keep AdamW's state in the parameters' dtype; ZeRO keeps a float32 master
        # copy and float32 moments (12 bytes) in mixed precision
        mixed = setting.sharding != "none" and c < 4
        gradients = shape.parameters * c / sharded_states
        optimizer_state = shape.parameters * ((12 if mixed else 2 * c) / sharded_states)
        trainable, state_bytes = shape.parameters, (4 if mixed else c)
        largest_trainable = shape.largest_parameter
    else:
        gradients, optimizer_state = 4 * adapters, 8 * adapters
        trainable, state_bytes = adapters, 4
        largest_trainable = max(shape.hidden, shape.intermediate) * setting.lora_r
    # a frozen RMSNorm weight needs no normalised value kept: 9 H instead of 11 H under LoRA
    layer_set = tokens * ((11 if full else 9) * shape.hidden + 4 * shape.intermediate) * c
    if setting.gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * c
    else:
        activations = shape.layers * layer_set
    if setting.attention in DENSE_MASK_ATTENTION:
        activations += tokens * tokens * c
    if setting.attention == "eager":
        kept = 1 if setting.gradient_checkpointing else shape.layers
        activations += kept * shape.heads * tokens * tokens * c
    scratch = DEFAULT_SCRATCH_BYTES if setting.device_type == "cuda" else 0
    loss_head = scored_tokens * (shape.hidden * 4 + 16) + scratch
    head_gradient = shape.vocab * shape.hidden * c if full else 0
    recomputed_layer = layer_set if setting.gradient_checkpointing else 0
    embedding_gradient = head_gradient if shape.tied else 0
    if setting.device_type == "cuda":  # foreach AdamW: a copy of the trainable parameters at once
        step_temporaries = trainable * state_bytes / sharded_states
    else:  # one parameter at a time: two temporaries of the largest
        step_temporaries = 2 * largest_trainable * state_bytes
    return MemoryEstimate(*(int(value) for value in (weights, gradients, optimizer_state, activations, loss_head,
                                                     head_gradient, recomputed_layer, embedding_gradient,
                                                     step_temporaries)))


def memory_report(policy, reference_model, *, rank: int, setting: MemorySetting, reference: Optional[str],
                  pairs: int, tokens: int, scored_tokens: int, decoder_layers: List[torch.nn.Module],
                  unit: str = "pair") -> List[str]:
    """One line per item, each starting with this process's rank. `reference`: "cache", "online",
    or None (a reference-free loss). `pairs`, `tokens`, `scored_tokens`: this process's largest
    micro-batch (its longest pairs, or unpaired examples: `unit`), its tokens in the packed forward
    and its response tokens. The weights, gradients and optimizer state are those of the tensors
    held; the activations, the loss head and the peak are estimates (:func:`estimate_memory`)."""
    lm = unwrap(policy)
    world_size, fsdp = setting.processes, setting.sharding == "zero3"
    trainable = [p for p in policy.parameters() if p.requires_grad]
    compute_bytes = setting.compute_bytes
    policy_bytes = stored_bytes(policy.parameters())
    parameters = f"parameters {_mib(policy_bytes)}"
    quantized = [p for p in policy.parameters() if _is_quantized(p)]
    if quantized:
        unquantized = [p for p in policy.parameters() if not _is_quantized(p)]
        parameters += (f" ({count_of(len(quantized), 'quantized weight')} {_mib(stored_bytes(quantized))} with "
                       f"their constants; the others, embeddings, norms, LM head and adapters included, "
                       f"{_mib(stored_bytes(unquantized))})")
    gathered = 0
    if fsdp:
        gathered = max(_full_numel(layer) for layer in decoder_layers) * compute_bytes
        in_layers = sum(_full_numel(layer) for layer in decoder_layers)
        root = (_full_numel(policy) - in_layers) * compute_bytes
        gathered += root
        parameters += (f" (this process's 1/{world_size} shards), plus while running: one decoder layer "
                       f"{_mib(gathered - root)} and the embeddings, norm and LM head {_mib(root)}, gathered")
    reference_bytes = 0
    if reference is None:
        held = "none (reference-free loss)"
    elif reference == "cache":
        held = "log-probs cached on disk, read per batch (no weights)"
    elif reference_model is None:
        held = "the policy with its adapter disabled (no extra weights)"
    else:
        reference_bytes = stored_bytes(reference_model.parameters())
        held = f"frozen model {_mib(reference_bytes)}" + (" (this process's shards)" if fsdp else "")
    estimate = estimate_memory(ModelShape.from_config(lm.config), setting, tokens=tokens, scored_tokens=scored_tokens)
    held_bytes = MemoryEstimate(
        weights=policy_bytes + gathered + reference_bytes, gradients=stored_bytes(trainable),
        optimizer_state=2 * stored_bytes(trainable), activations=estimate.activations, loss_head=estimate.loss_head,
        head_gradient=estimate.head_gradient, recomputed_layer=estimate.recomputed_layer,
        embedding_gradient=estimate.embedding_gradient, step_temporaries=estimate.step_temporaries)
    moment, _ = max(held_bytes.moments.items(), key=lambda item: item[1])
    when = {"forward": "the forward's end", "backward": "the backward's end"}.get(moment, "the " + moment)
    lines = [
        parameters,
        f"gradients {_mib(held_bytes.gradients)}",
        f"optimizer state (AdamW) {_mib(held_bytes.optimizer_state)}",
        f"reference: {held}",
        f"activations per micro-batch (estimate, the data's "
        f"{f'longest {unit}' if pairs == 1 else f'{pairs} longest {unit}s'}: {count_of(tokens, 'token')}"
        f"{', gradient checkpointing' if setting.gradient_checkpointing else ''}) {_mib(held_bytes.activations)}",
        f"loss head per micro-batch (fused, {count_of(scored_tokens, 'response token')}) {_mib(held_bytes.loss_head)}; "
        f"materialised logits would take {_mib(scored_tokens * lm.config.get_text_config().vocab_size * 4)}",
        f"peak (estimate, at {when}: weights, optimizer state and what that moment holds) "
        f"{_mib(held_bytes.peak)}",
    ]
    return [f"[rank {rank}] memory: {line}" for line in lines]
