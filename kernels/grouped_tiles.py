"""Grouped rasterisation of a 2-D grid of output tiles."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_rows, num_columns, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 GROUP_N: tl.constexpr):
    """(row block, column block) of program `pid`: program ids walk GROUP_N row blocks down one
    column block before the next column block, so the programs that share a column block's operand
    tile run together and read it from L2 rather than HBM."""
    row_blocks = tl.cdiv(num_rows, BLOCK_N)
    col_blocks = tl.cdiv(num_columns, BLOCK_C)
    per_group = GROUP_N * col_blocks
    first_row_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_N)
    row_block = first_row_block + (pid % per_group) % group_rows
    col_block = (pid % per_group) // group_rows
    return row_block, col_block
