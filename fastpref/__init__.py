"""fastpref: fused kernels for preference optimization without full-vocabulary logits."""


def _register_kernels_package():
    """Makes ``fastpref.kernels`` the source tree's top-level ``kernels/`` folder where fastpref
    runs from a source tree (an editable install or a checkout on ``sys.path``).

    That folder has no ``__init__.py``: from the repository root (``python -m``, ``torchrun -m``, a
    script saved there) a folder without one is only a namespace portion, which never hides an
    installed distribution of the same name, such as the Hub's ``kernels`` that transformers imports.
    An installed wheel holds the folder as ``fastpref/kernels/``, which Python finds by itself;
    setuptools' editable finder does not resolve a namespace subpackage, hence this.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    name = f"{__name__}.kernels"
    package_dir = os.path.dirname(os.path.abspath(__file__))
    source_kernels = os.path.join(os.path.dirname(package_dir), "kernels")
    if name in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    if not os.path.isdir(source_kernels):
        raise ImportError(f"fastpref's Triton kernels are missing: neither {package_dir}/kernels "
                          f"nor {source_kernels} exists (a broken install: reinstall fastpref)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [source_kernels]
    sys.modules[name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_register_kernels_package()
del _register_kernels_package

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
    "preference_loss",
    "raise_pending_errors",
    "registered_backends",
    "sequence_logps",
    "set_scratch_bytes",
]
