"""The backward's fused recompute + logit-gradient kernel in persistent, TMA-fed form (sm_90).

The same math as kernels/linear_logprobs_backward.py, from the same epilogue
(`logit_gradient_tile`): per vocabulary slab, the logits x = h W_s^T + b are recomputed tile by
tile and

    dz_{n,v} = J_{n,v} g_n (1[v = t_n] - p_{n,v})  [- J g^H_n p_{n,v} (log p_{n,v} + entropy_n)]

is written to the [N, Vs] scratch. What differs is how the work reaches the SMs:

- persistent: NUM_PROGRAMS programs (one per SM) walk the slab's (row tile, vocabulary tile)
  work items, program p taking items p, p + NUM_PROGRAMS, ...; the items are numbered in grouped
  rasterisation order (GROUP_N row tiles down one vocabulary tile before the next), so the
  programs running at any moment share a few weight tiles in L2. No wave tail: every SM works to
  the end of the slab.
- TMA: h and W tiles come through tensor descriptors made on the device, so on sm_90 they are
  bulk tensor copies into shared memory (cp.async.bulk.tensor) that the software pipeline
  overlaps with the wgmma of earlier K-steps; ragged edges arrive as zeros without masks. dz
  leaves through a descriptor too (an asynchronous bulk store that clips the ragged edges), so
  the scratch's row stride must be a multiple of 16 bytes (kernels/tensor_descriptors.py).

Not warp-specialised: Triton 3.9 takes ``tl.range(..., warp_specialize=True)`` on sm_90 without an
error and leaves the loop unpartitioned, on the outer (work item) loop or the K loop alike: the
compiled sm_90 kernel has no ``ttg.warp_specialize`` region and no setmaxnreg, as for a plain
persistent TMA matmul (Triton's persistent-matmul tutorial turns warp_specialize on from
capability 10 only). So the epilogue still runs between the tile's tensor-core steps. ``fastpref kernels`` reports, per binary, whether
it is warp-specialised and whether it uses TMA.
"""
import torch
import triton
import triton.language as tl

from .grouped_tiles import grouped_tile
from .linear_logprobs_backward import logit_gradient_tile, store_bias_gradient_sums
from .logits_tile import logits_tile_from_descriptors
from .tensor_descriptors import launch_with_descriptor_workspace


@triton.jit
def _persistent_logit_gradient_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, miss_ptr, grad_ptr, entropy_ptr, grad_entropy_ptr,
    dz_ptr, bias_grad_ptr,
    num_rows, slab_columns, width, vocab, slab_start, dz_row_stride, bias_grad_row_stride, pre, post,
    HAS_BIAS: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    hidden_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[num_rows, width], strides=[width, 1],
                                            block_shape=[BLOCK_N, BLOCK_H])
    weight_desc = tl.make_tensor_descriptor(weight_ptr, shape=[vocab, width], strides=[width, 1],
                                            block_shape=[BLOCK_V, BLOCK_H])
    dz_desc = tl.make_tensor_descriptor(dz_ptr, shape=[num_rows, slab_columns], strides=[dz_row_stride, 1],
                                        block_shape=[BLOCK_N, BLOCK_V])
    num_tiles = tl.cdiv(num_rows, BLOCK_N) * tl.cdiv(slab_columns, BLOCK_V)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        row_block, col_block = grouped_tile(tile, num_rows, slab_columns, BLOCK_N, BLOCK_V, GROUP_N)
        rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        local_cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < num_rows
        col_mask = local_cols < slab_columns
        cols = slab_start + local_cols
        # weight rows past the slab (or past V: zeros) make columns that the clipped store drops
        x = logits_tile_from_descriptors(hidden_desc, weight_desc, bias_ptr, row_block * BLOCK_N,
                                         slab_start + col_block * BLOCK_V, cols, col_mask, width,
                                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        dz = logit_gradient_tile(x, rows, row_mask, cols, targets_ptr, lse_ptr, miss_ptr, grad_ptr, entropy_ptr,
                                 grad_entropy_ptr, pre, post, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
        dz_desc.store([row_block * BLOCK_N, col_block * BLOCK_V], dz.to(dz_ptr.dtype.element_ty))
        if NEED_BIAS_GRAD:
            store_bias_gradient_sums(dz, row_mask, local_cols, col_mask, bias_grad_ptr, row_block,
                                     bias_grad_row_stride)


def persistent_logit_gradient(hidden, weight, bias, targets, lse, miss, grad, dz, slab_start, bias_grad_partial=None,
                              entropy=None, grad_entropy=None, *, pre, post, softcap,
                              block_n, block_v, block_h, group_n, num_programs, num_warps, num_stages, upcast):
    """linear_logprobs_backward.logit_gradient's contract, on at most `num_programs` persistent
    programs. hidden, weight and dz must be descriptor_compatible (kernels/tensor_descriptors.py)."""
    num_rows, width = hidden.shape
    columns = dz.shape[1]
    tiles = triton.cdiv(num_rows, block_n) * triton.cdiv(columns, block_v)
    has_entropy_grad = grad_entropy is not None

    def launch():
        _persistent_logit_gradient_kernel[(min(num_programs, tiles),)](
            hidden, weight, hidden if bias is None else bias, targets, lse, miss, grad,
            entropy if has_entropy_grad else lse, grad_entropy if has_entropy_grad else grad, dz,
            lse if bias_grad_partial is None else bias_grad_partial,
            num_rows, columns, width, weight.shape[0], slab_start, dz.stride(0),
            0 if bias_grad_partial is None else bias_grad_partial.stride(0), pre, post,
            HAS_BIAS=bias is not None, NEED_BIAS_GRAD=bias_grad_partial is not None, HAS_SOFTCAP=softcap,
            HAS_ENTROPY_GRAD=has_entropy_grad,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP_N=group_n, NUM_PROGRAMS=num_programs,
            UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )

    launch_with_descriptor_workspace(hidden.device, launch)
