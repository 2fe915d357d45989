"""fastpref: fused kernels for preference optimization without full-vocabulary logits."""
from ._buffers import poison_outputs
from .backends import available_backends, registered_backends, set_scratch_bytes
from .layout import PackedBatch, PackedLayout, pack_padded
from .linear_logprobs import check_linear_inputs, linear_logprobs
from .loss_spec import LOSS_TYPES, LossSpec
from .losses import PreferenceLoss, ReferenceHead, preference_loss, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "LOSS_TYPES",
    "LossSpec",
    "PackedBatch",
    "PackedLayout",
    "PreferenceLoss",
    "ReferenceHead",
    "available_backends",
    "check_linear_inputs",
    "linear_logprobs",
    "pack_padded",
    "poison_outputs",
    "preference_loss",
    "registered_backends",
    "sequence_logps",
    "set_scratch_bytes",
]
