"""Triton kernels of fastpref (installed as ``fastpref.kernels``).

One kernel per file, each with its host-side launcher (device functions and host helpers
shared by several kernels live beside them: logits_tile, scalar_math, grouped_tiles,
tensor_descriptors). Launchers expect validated, compacted,
contiguous inputs: the checks live in :mod:`fastpref.linear_logprobs`.
"""
