"""Triton kernels of fastpref (installed as ``fastpref.kernels``).

One kernel per file, each with its host-side launcher. Launchers expect validated, compacted,
contiguous inputs: the checks live in :mod:`fastpref.linear_logprobs`.
"""
