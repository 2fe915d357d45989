"""Multi-process training on torch.distributed (launched by torchrun or accelerate).

Every rank holds the whole (tokenized) data set and walks the same global order; each global
micro-batch is split across ranks, and each rank scales its local loss so that DDP's gradient
average equals the gradient of the global batch's mean loss — the run matches a one-process run
with the same global batch, whatever the split. A rank without a pair of a micro-batch (the
epoch's last can hold fewer pairs than there are ranks) runs a placeholder with weight 0, so that
every rank joins every collective with tensors of the same size. The reference log-probs are
computed the same way, each rank its share of every batch, and gathered on all. Rank 0 alone
writes the reference cache, checkpoints, logs and the final model; the others wait at barriers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    # False: every process runs every batch (a tensor-parallel model), nothing is split or averaged
    data_parallel: bool = True

    @staticmethod
    def environment_world_size() -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @staticmethod
    def environment_rank() -> int:
        return int(os.environ.get("RANK", "0"))

    @classmethod
    def from_environment(cls, device_preference: str) -> "Distributed":
        """Join the process group torchrun/accelerate describe in the environment (if any)."""
        world_size = cls.environment_world_size()
        if world_size <= 1:
            return cls()
        rank, local_rank = cls.environment_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            use_cuda = device_preference != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(world_size, rank, local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_processes(self) -> int:
        """The processes a global batch is split over."""
        return self.world_size if self.data_parallel else 1

    def shard(self, items: Sequence) -> List:
        """This rank's share of a global batch (round-robin, so shards differ by at most one)."""
        if not self.data_parallel:
            return list(items)
        return list(items[self.rank::self.world_size])

    def broadcast_object(self, value):
        """Rank 0's `value` (any picklable object), on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_shards(self, local: Sequence, total: int) -> List:
        """Every rank's `shard` of a `total`-item batch, put back in order: the inverse of `shard`,
        on every rank."""
        if not (self.enabled and self.data_parallel):
            return list(local)
        shards = [None] * self.world_size
        dist.all_gather_object(shards, list(local))
        items = [None] * total
        for rank, shard in enumerate(shards):
            items[rank::self.world_size] = shard
        return items

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def weighted_mean(self, records: Sequence[Dict[str, float]], weights: Sequence[float], device) -> Dict[str, float]:
        """The mean of `records` over all ranks, each record counting its weight (its pairs; 0 for a
        placeholder batch a rank ran only to join a collective).

        Every rank must pass records with the same keys, and at least one: the keys size the
        all-reduce, and ranks reducing tensors of different sizes abort (gloo) or hang (NCCL). The
        callers ensure it by recording every batch they run, placeholders included, with weight 0.
        """
        keys = sorted(records[0])
        if any(sorted(record) != keys for record in records):
            raise ValueError(f"every record must have the keys {keys}")
        sums = [sum(record[k] * w for record, w in zip(records, weights) if w) for k in keys]
        packed = torch.tensor(sums + [float(sum(weights))], dtype=torch.float64, device=device)
        if self.enabled and self.data_parallel:
            dist.all_reduce(packed)
        total = float(packed[-1])
        return {k: float(v) / total if total else float("nan") for k, v in zip(keys, packed[:-1])}

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all ranks, on every rank, left on the device (no host read)."""
        if not self.enabled:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def max_over_ranks(self, value: int, device) -> int:
        """The largest `value` any rank holds, on every rank (e.g. a stop request)."""
        if not self.enabled:
            return value
        packed = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return int(packed[0])
