"""The GPU architectures fastpref's kernels are compiled for, and their limits."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """name: "sm_90"; capability: 90; multiprocessors: SM count of the reference GPU (it sizes the
    launchers' grids); shared_memory_bytes: the most one block may use (opt-in limit)."""

    name: str
    capability: int
    gpu: str
    multiprocessors: int
    shared_memory_bytes: int

    @property
    def has_wgmma(self) -> bool:
        return self.capability == 90


ARCHES = {
    arch.name: arch
    for arch in (
        Arch("sm_90", 90, "H100/H200", multiprocessors=132, shared_memory_bytes=227 * 1024),
        Arch("sm_80", 80, "A100", multiprocessors=108, shared_memory_bytes=163 * 1024),
    )
}
