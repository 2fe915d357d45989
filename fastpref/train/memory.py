"""What one process will hold, reported before the first step, so a configuration that cannot fit
is seen as such at once.

Per process: the parameters, gradients and AdamW state it keeps (under FSDP2 its shards, plus the
whole weights of one decoder layer and of the root group while they run, in the compute dtype);
the reference; and, per micro-batch, an estimate of the activations the backward keeps and the
fused loss head's own memory. The activation estimate assumes attention that stores no [T x T]
matrix (flash, SDPA, flex) and, per token and decoder layer, the tensors a Llama-style layer saves
for its backward: about 8 H + 4 I values (H hidden, I MLP width); with gradient checkpointing, one
H-vector per token and layer plus one layer's full set. The fused head keeps O(H) floats per scored
token, where materialised logits would take V.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from ..causal_lm import unwrap
from .wording import count_of

MIB = 1 << 20


def _quantization_constants(tensor: torch.Tensor) -> List[torch.Tensor]:
    """bitsandbytes' constants of a quantized weight: a 4-bit weight's per-block scales (and, with
    double quantization, their own), an 8-bit weight's per-row scales; none for other tensors."""
    state = getattr(tensor, "quant_state", None)
    constants = [getattr(tensor, "SCB", None)]
    while state is not None:
        constants += [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
        state = getattr(state, "state2", None)
    return [constant for constant in constants if constant is not None]


def _local_bytes(tensors: Iterable[torch.Tensor]) -> int:
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


def memory_report(policy, reference_model, *, rank: int, world_size: int, fsdp: bool, compute_dtype: torch.dtype,
                  reference: Optional[str], pairs: int, tokens: int, scored_tokens: int,
                  gradient_checkpointing: bool, decoder_layers: List[torch.nn.Module], unit: str = "pair") -> List[str]:
    """One line per item, each starting with this process's rank. `reference`: "cache", "online",
    or None (a reference-free loss). `pairs`, `tokens`, `scored_tokens`: this process's largest
    micro-batch (its longest pairs, or unpaired examples: `unit`), its tokens in the packed forward
    and its response tokens."""
    config = unwrap(policy).config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    width = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = config.vocab_size
    trainable = [p for p in policy.parameters() if p.requires_grad]
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    parameters = f"parameters {_mib(_local_bytes(policy.parameters()))}"
    quantized = [p for p in policy.parameters() if _is_quantized(p)]
    if quantized:
        unquantized = [p for p in policy.parameters() if not _is_quantized(p)]
        parameters += (f" ({count_of(len(quantized), 'quantized weight')} {_mib(_local_bytes(quantized))} with "
                       f"their constants; the others, embeddings, norms, LM head and adapters included, "
                       f"{_mib(_local_bytes(unquantized))})")
    if fsdp:
        gathered = max(_full_numel(layer) for layer in decoder_layers) * compute_bytes
        in_layers = sum(_full_numel(layer) for layer in decoder_layers)
        root = (_full_numel(policy) - in_layers) * compute_bytes
        parameters += (f" (this process's 1/{world_size} shards), plus while running: one decoder layer "
                       f"{_mib(gathered)} and the embeddings, norm and LM head {_mib(root)}, gathered")
    if reference is None:
        held = "none (reference-free loss)"
    elif reference == "cache":
        held = "log-probs cached on disk, read per batch (no weights)"
    elif reference_model is None:
        held = "the policy with its adapter disabled (no extra weights)"
    else:
        held = f"frozen model {_mib(_local_bytes(reference_model.parameters()))}" + (
            " (this process's shards)" if fsdp else "")
    per_layer_token = (8 * hidden + 4 * width) * compute_bytes
    if gradient_checkpointing:
        activations = tokens * (layers * hidden * compute_bytes + per_layer_token)
    else:
        activations = tokens * layers * per_layer_token
    head = scored_tokens * (hidden * 4 + 16)
    lines = [
        parameters,
        f"gradients {_mib(_local_bytes(trainable))}",
        f"optimizer state (AdamW) {_mib(2 * _local_bytes(trainable))}",
        f"reference: {held}",
        f"activations per micro-batch (estimate, the data's "
        f"{f'longest {unit}' if pairs == 1 else f'{pairs} longest {unit}s'}: {count_of(tokens, 'token')}"
        f"{', gradient checkpointing' if gradient_checkpointing else ''}) {_mib(activations)}",
        f"loss head per micro-batch (fused, {count_of(scored_tokens, 'response token')}) {_mib(head)}; "
        f"materialised logits would take {_mib(scored_tokens * vocab * 4)}",
    ]
    return [f"[rank {rank}] memory: {line}" for line in lines]
