"""fastpref: fused kernels for preference optimization without full-vocabulary logits."""
from ._buffers import poison_outputs
from .backends import available_backends, registered_backends
from .linear_logprobs import check_linear_inputs, linear_logprobs

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "check_linear_inputs",
    "linear_logprobs",
    "poison_outputs",
    "registered_backends",
]
