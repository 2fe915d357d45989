"""fastpref: fused kernels for preference optimization without full-vocabulary logits."""
from ._buffers import poison_outputs
from .backends import available_backends, registered_backends
from .backends.scratch import set_scratch_bytes
from .deferred_errors import raise_pending_errors
from .layout import PackedBatch, PackedLayout, pack_padded
from .linear_logprobs import OUTPUT_NAMES, LinearLogprobsOutput, check_linear_inputs, linear_logprobs
from .logit_transform import LogitTransform
from .loss_spec import LOSS_TYPES, LossSpec
from .losses import PreferenceLoss, ReferenceHead, preference_loss, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "LOSS_TYPES",
    "OUTPUT_NAMES",
    "LinearLogprobsOutput",
    "LogitTransform",
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
    "raise_pending_errors",
    "registered_backends",
    "sequence_logps",
    "set_scratch_bytes",
]
