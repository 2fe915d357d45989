"""The memory budget of the backends' scratch buffers, and the slab widths it allows."""
from __future__ import annotations

# The most memory the backward's logit-gradient scratch may take: it sets the vocabulary slab
# width, Vs = scratch / (N * element bytes). At N = 16,384 bf16 rows that is 2,048 columns, and with
# the hidden gradient's bfloat16 remainder (128 MiB at H = 4,096) the backward's extra memory is
# 192 MiB, under 1% of the 19.6 GiB that materialized logits take there (fastpref plan).
DEFAULT_SCRATCH_BYTES = 64 << 20
_default_scratch_bytes = DEFAULT_SCRATCH_BYTES


def check_scratch_bytes(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"scratch_bytes must be a positive int, got {value!r}")
    return value


def set_scratch_bytes(value: int) -> None:
    """Set the process-wide default of the op's ``scratch_bytes=`` argument: the memory budget
    (bytes) of the backward's [N, Vs] scratch and of the frozen pass's blocks. Smaller slabs run
    more but smaller matmuls. The budget is a floor of one tile of columns, whatever the value."""
    global _default_scratch_bytes
    _default_scratch_bytes = check_scratch_bytes(value)


def scratch_bytes() -> int:
    """The process-wide default budget (DEFAULT_SCRATCH_BYTES unless set_scratch_bytes changed it)."""
    return _default_scratch_bytes


def slab_columns(num_rows: int, vocab: int, element_bytes: int, budget: int, multiple: int = 1) -> int:
    """The widest vocabulary slab whose [num_rows, columns] scratch of element_bytes fits the
    budget: a multiple of `multiple` columns (a kernel's tile), at least one, at most V."""
    columns = budget // max(1, num_rows * element_bytes) // multiple * multiple
    return int(max(multiple, min(columns, vocab)))
