"""CUDA backend: the fused ops without Triton, for GPUs and platforms where Triton does not run
(older GPUs, some Windows setups). It keeps the Triton backend's memory bound and gets its GEMM
speed from cuBLAS: the matmuls are torch's own (cuBLAS, float32 output), and the extension
``fastpref._C`` (csrc/) adds only the epilogues around them and the preference losses.

The linear log-probs run over vocabulary slabs of S columns spanning all N rows, S the widest
whose float32 logits plus a logit gradient in the inputs' dtype fit the scratch budget
(fastpref.set_scratch_bytes): S = budget / (N (4 + element bytes)). Per slab W_s, with z = s(x + b)
the transformed logits (fastpref.logit_transform: the kernels take its pre, post and soft-cap flag)
and J = dz/dx:

- forward: x = h W_s^T (cuBLAS, 2NHS FLOPs), then slab_softmax_update (csrc/slab_epilogues.cu)
  adds the bias, transforms, and carries each row's online softmax across slabs,
      m' = max(m, max_v z_v),  s' = s exp(m - m') + sum_{v != t} exp(z_v - m'),  z_t,
  and the sums of the per-token outputs asked for (backends.online_softmax); after the last slab
  merge_vocabulary_parts of the one state gives lse, miss = 1 - p_t, logp and the outputs.
- backward: x recomputed (2NHS); slab_logit_gradient writes, in the inputs' dtype,
      dx = J dz,  dz = -g p off the target, g miss on it, - g_H p (log p + H) with the entropy's gradient;
  then d_weight[slab] = dx^T h (cuBLAS, written once in the weight's dtype, 2NHS),
  d_bias[slab] = sum_n dx (over the unrounded float32 dx the kernel leaves in the logits' place)
  and d_hidden += dx W_s (2NHS). Float32 inputs add into a float32 d_hidden; half precision keeps
  d_hidden = hi in its own dtype plus a bfloat16 compensation buffer lo, the product taken in
  float32 row chunks and folded in by compensated_accumulate (csrc/compensated_accumulate.cu):
  s = hi + lo + p, hi = round(s), lo = round_bf16(s - hi), so d_hidden is rounded about once
  however many slabs there are, without a float32 [N, H].
- a frozen head whose hidden gradient the op folds into the forward (no entropy asked for)
  takes the torch backend's slab forward that also accumulates u = J_t W_t - sum_v p_v J_v W_v
  (cuBLAS and element-wise ops), after which the backward is a scale: 4NHV FLOPs in all instead of
  6NHV.

Trainable head: 8NHV FLOPs, all of them in cuBLAS GEMMs. Extra memory: the budget, plus for half
precision the bfloat16 lo [N, H] (the float32 product chunks reuse the logits slab). No kernel here
adds twice to one address: no atomics.

The kernels take raw pointers: every tensor handed to them is made contiguous and of the dtype
they expect here. Each launch goes to the inputs' device on its current stream; nothing
synchronises the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._buffers import new_output
from . import Backend, ForwardResult, HeadOptions, torch_backend
from .gemm import add_matmul_float32, low_part_dtype, matmul_into
from .online_softmax import merge_vocabulary_parts
from .scratch import slab_columns

try:
    from .. import _C

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _C = None
    _IMPORT_ERROR = (
        f"the CUDA extension fastpref._C is not built ({exc}); build it with nvcc on PATH "
        "(or CUDA_HOME set): FASTPREF_BUILD_CUDA=1 pip install --no-build-isolation -e . "
        "(see csrc/README.md)"
    )

FLOAT32_BYTES = 4
# Rows (one warp each) a slab epilogue launch is given to keep a GPU's memory busy: two full
# waves of an H100's 132 SMs x 64 warp slots, what the two-op path's slabs of all N rows give at
# N = 16,384 (see _Segments).
EPILOGUE_ROWS = 16384
# bfloat16 storage and arithmetic in the epilogues need Ampere or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _dtype_code(dtype: torch.dtype) -> int:
    return {
        torch.float32: _C.DTYPE_FLOAT32,
        torch.float16: _C.DTYPE_FLOAT16,
        torch.bfloat16: _C.DTYPE_BFLOAT16,
    }[dtype]


def _launch_on(tensor: torch.Tensor) -> dict:
    """Where the kernels run: the tensor's device and that device's current stream."""
    return {"device": tensor.device.index,
            "stream": torch.cuda.current_stream(tensor.device).cuda_stream}


def _pointer(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _index(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int64).contiguous()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


class _Slabs:
    """The vocabulary slabs of one pass and their float32 logits scratch (at least one row of H,
    so that the backward can reuse it for the hidden gradient's product chunks)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, budget: int):
        self.hidden, self.weight = hidden, weight
        (self.num_rows, width), self.vocab = hidden.shape, weight.shape[0]
        self.columns = slab_columns(self.num_rows, self.vocab, 4 + hidden.element_size(), budget)
        self.scratch = new_output((max(self.num_rows * self.columns, width),), torch.float32, hidden.device)

    def __iter__(self):
        """(start, stop, x) per slab: x = h W[start:stop]^T, a contiguous float32 [N, stop - start]."""
        for start in range(0, self.vocab, self.columns):
            stop = min(self.vocab, start + self.columns)
            logits = self.scratch[:self.num_rows * (stop - start)].view(self.num_rows, stop - start)
            yield start, stop, matmul_into(logits, self.hidden, self.weight[start:stop].t())


def _slab_arguments(hidden, vocab: int, bias, targets, start: int, stop: int, logits) -> dict:
    """The arguments every slab epilogue takes: logits, the float32 [rows, stop - start] of the
    rows of hidden (and of targets) and the columns [start, stop)."""
    return dict(logits=logits.data_ptr(), bias=_pointer(bias), targets=targets.data_ptr(),
                num_rows=logits.shape[0], columns=stop - start, slab_start=start, vocab=vocab,
                dtype=_dtype_code(hidden.dtype), **_launch_on(hidden))


def _prepared(hidden, weight, bias, targets):
    return (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            _index(targets))


# The rows' online-softmax state slab_softmax_update carries (backends.online_softmax), with the
# values it starts from: the first three always, the others for the outputs that need them.
_ROW_STATE = {"row_max": float("-inf"), "sum_excl": 0.0, "target_logit": 0.0, "sum_all": 0.0, "shifted": 0.0,
              "sum_sq": 0.0, "logit_sum": 0.0, "max_before": float("-inf")}
_STATE_OF_OUTPUT = {"entropy": ("sum_all", "shifted"), "log_sum_sq_probs": ("sum_sq",),
                    "mean_logits": ("logit_sum",), "is_top1": ("max_before",)}


def _transform_arguments(options: HeadOptions) -> dict:
    transform = options.transform
    return dict(pre=transform.pre, post=transform.post, softcap=transform.softcap is not None)


def forward(hidden, weight, bias, targets, options: HeadOptions, fold_hidden_gradient: bool) -> ForwardResult:
    if fold_hidden_gradient:
        return torch_backend.forward(hidden, weight, bias, targets, options, fold_hidden_gradient=True)
    hidden, weight, bias, targets = _prepared(hidden, weight, bias, targets)
    num_rows = hidden.shape[0]
    names = ["row_max", "sum_excl", "target_logit"]
    names += [name for output in sorted(options.outputs) for name in _STATE_OF_OUTPUT[output]]
    state = _initial_row_state(names, num_rows, hidden.device)
    slabs = _Slabs(hidden, weight, options.scratch_bytes)
    for start, stop, logits in slabs:
        _softmax_update(state, options, slabs.hidden, slabs.vocab, bias, targets, start, stop, logits)
    return _row_result(state, weight.shape[0])


def _initial_row_state(names, num_rows: int, device) -> dict:
    return {name: torch.full((num_rows,), _ROW_STATE[name], dtype=torch.float32, device=device) for name in names}


def _softmax_update(state: dict, options: HeadOptions, hidden, vocab: int, bias, targets, start: int, stop: int,
                    logits) -> None:
    """Fold the slab `logits` (columns [start, stop), read only) into the rows' softmax state."""
    _C.slab_softmax_update(**{name: _pointer(state.get(name)) for name in _ROW_STATE},
                           **_transform_arguments(options),
                           **_slab_arguments(hidden, vocab, bias, targets, start, stop, logits))


def _row_result(state: dict, vocab: int) -> ForwardResult:
    parts = {name: values[None] for name, values in state.items()}
    return merge_vocabulary_parts(parts.pop("row_max"), parts.pop("sum_excl"), parts.pop("target_logit"),
                                  vocab=vocab, **parts)


class _HiddenGradient:
    """d_hidden = sum over slabs of dz W_slab, without atomics.

    Float32 inputs: cuBLAS adds each product into d_hidden (float32). Half precision: d_hidden is
    hi, in the inputs' dtype, with lo a bfloat16 compensation buffer; each slab's product is taken
    in float32 chunks of rows and folded in by compensated_accumulate (hi + lo carry float32-like
    precision; hi is the result). The chunks are written over `product_scratch`, the slab's float32
    logits, dead once dz is formed: as many rows as it holds (5,460 at N = 16,384, H = 4,096 and the
    default budget, GEMMs cuBLAS runs at full speed), and no memory beyond the budget.
    """

    def __init__(self, hidden: torch.Tensor, product_scratch: torch.Tensor):
        num_rows, width = hidden.shape
        self.hi = torch.zeros_like(hidden)
        low_dtype = low_part_dtype(hidden.dtype)
        self.compensated = low_dtype is not None
        if self.compensated:
            self.lo = torch.zeros((num_rows, width), dtype=low_dtype, device=hidden.device)
            self.chunk_rows = min(num_rows, product_scratch.numel() // width)
            self.product = product_scratch[:self.chunk_rows * width].view(self.chunk_rows, width)

    def add(self, dz: torch.Tensor, weight_slab: torch.Tensor) -> None:
        if not self.compensated:
            self.hi.addmm_(dz, weight_slab)
            return
        num_rows, width = self.hi.shape
        for r0 in range(0, num_rows, self.chunk_rows):
            r1 = min(num_rows, r0 + self.chunk_rows)
            product = matmul_into(self.product[:r1 - r0], dz[r0:r1], weight_slab)
            _C.compensated_accumulate(product=product.data_ptr(), hi=self.hi[r0:r1].data_ptr(),
                                      lo=self.lo[r0:r1].data_ptr(), count=(r1 - r0) * width,
                                      dtype=_dtype_code(self.hi.dtype), **_launch_on(self.hi))


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp, grad_entropy,
             options: HeadOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    if saved.hidden_grad_direction is not None:
        return torch_backend.backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, options,
                                      need_hidden, need_weight, need_bias)
    need_bias = need_bias and bias is not None
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    hidden, weight, bias, targets = _prepared(hidden, weight, bias, targets)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    lse, miss, grad = _float32(saved.lse), _float32(saved.miss), _float32(grad_logp)
    entropy = None if grad_entropy is None else _float32(saved.entropy)
    grad_entropy = None if grad_entropy is None else _float32(grad_entropy)
    slabs = _Slabs(hidden, weight, options.scratch_bytes)
    d_hidden = _HiddenGradient(hidden, slabs.scratch) if need_hidden else None
    d_weight = new_output(weight.shape, weight.dtype, weight.device) if need_weight else None
    d_bias = new_output((vocab,), torch.float32, weight.device) if need_bias else None
    dz_scratch = new_output((num_rows * slabs.columns,), hidden.dtype, hidden.device)
    for start, stop, logits in slabs:
        dz = dz_scratch[:num_rows * (stop - start)].view(num_rows, stop - start)
        _logit_gradient(dz, lse, miss, grad, entropy, grad_entropy, need_bias, options, slabs.hidden, slabs.vocab,
                        bias, targets, start, stop, logits)
        if need_weight:
            matmul_into(d_weight[start:stop], dz.t(), hidden)
        if need_bias:
            d_bias[start:stop] = logits.sum(dim=0)  # the unrounded dz, over the logits
        if need_hidden:  # last: its product chunks overwrite the logits
            d_hidden.add(dz, weight[start:stop])
    return (None if d_hidden is None else d_hidden.hi, d_weight,
            None if d_bias is None else d_bias.to(bias.dtype))


def _logit_gradient(dz, lse, miss, grad, entropy, grad_entropy, float32_dz_into_logits: bool, options: HeadOptions,
                    hidden, vocab: int, bias, targets, start: int, stop: int, logits) -> None:
    """dz = J dL/dz of the slab `logits` into dz, in hidden's dtype (and, float32_dz_into_logits,
    unrounded over the logits)."""
    _C.slab_logit_gradient(lse=lse.data_ptr(), miss=miss.data_ptr(), grad_logp=grad.data_ptr(),
                           entropy=_pointer(entropy), grad_entropy=_pointer(grad_entropy),
                           dz=dz.data_ptr(), float32_dz_into_logits=float32_dz_into_logits,
                           **_transform_arguments(options),
                           **_slab_arguments(hidden, vocab, bias, targets, start, stop, logits))


class _Segments:
    """A slab of a group's logits as the slab epilogues see it. They run one warp per row, and a
    group has few rows (2,048 by default) for its V columns: too few warps in flight to stream
    the slab at the memory's speed. So a slab [R, S] of rows' consecutive columns is taken as
    [R k, S / k], each row's k column segments a row of their own (the same memory, no copy),
    k the largest power of two dividing S with R k <= EPILOGUE_ROWS, each segment's targets
    shifted to its own columns, and the k partial softmax states merged like any vocabulary
    parts. With a bias k = 1 (the kernels add the bias of their slab's columns)."""

    def __init__(self, rows: int, start: int, stop: int, has_bias: bool, targets: torch.Tensor):
        self.rows, columns = rows, stop - start
        self.count = 1
        while not has_bias and rows * self.count * 2 <= EPILOGUE_ROWS and columns % (self.count * 2) == 0:
            self.count *= 2
        if self.count == 1:
            self.targets, self.start, self.stop = targets, start, stop
        else:
            width = columns // self.count
            offsets = start + width * torch.arange(self.count, device=targets.device)
            self.targets = (targets[:, None] - offsets).reshape(-1)
            self.start, self.stop = 0, width

    def view(self, slab: torch.Tensor) -> torch.Tensor:
        return slab.view(self.rows * self.count, -1)

    def repeat(self, per_row: torch.Tensor) -> torch.Tensor:
        """A per-row value for each of the row's segments."""
        return per_row.repeat_interleave(self.count).contiguous() if self.count > 1 else per_row


def forward_backward_by_groups(hidden, weight, bias, targets, groups, token_gradient, options: HeadOptions,
                               need_hidden: bool, need_weight: bool, need_bias: bool, store_bytes: int):
    """torch_backend.forward_backward_by_groups (same arguments and results) in cuBLAS GEMMs and
    this backend's slab epilogues. Per group of R rows h, over vocabulary slabs of
    S = min(V, store_bytes / 4R) columns (the first slab kept in the store, the others
    recomputed; with the default sizing of fastpref.head_loss the one slab is the whole
    vocabulary):

        pass 1:  x_s = h W_s^T (cuBLAS, float32), slab_softmax_update;  g = token_gradient(rows, logp)
        pass 2:  slab_logit_gradient of x_s (kept or recomputed) -> dz_s in the inputs' dtype,
                 dW_s (+)= dz_s^T h,  db_s += sum_n dz_s,  dh += dz_s W_s   (cuBLAS).

    A group whose logits fit the store costs 6RHV FLOPs, all in three GEMMs, and its hidden
    gradient is one GEMM (K = V), written once. The weight gradient is written by the first group
    and, with more groups, accumulated in float32 (cuBLAS adds into a float32 [V, H]) and rounded
    once at the end. Memory beyond the results: the store (R S float32), dz (R S in the inputs'
    dtype), the float32 [V, H] with more than one group of half-precision inputs, and a float32
    [R, H] with more than one slab. Per-token outputs are not computed here.
    """
    hidden, weight, bias, targets = _prepared(hidden, weight, bias, targets)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    largest = max((rows.numel() for rows in groups), default=1)
    columns = max(1, min(vocab, store_bytes // (FLOAT32_BYTES * largest)))
    store = new_output((largest * columns,), torch.float32, hidden.device)
    dz_scratch = new_output((largest * columns,), hidden.dtype, hidden.device)

    logp = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros_like(hidden) if need_hidden else None
    accumulate_weight = need_weight and (len(groups) > 1 or weight.dtype == torch.float32)
    d_weight = None
    if need_weight:
        d_weight = new_output(weight.shape, torch.float32 if accumulate_weight else weight.dtype, weight.device)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    for index, rows in enumerate(groups):
        count = rows.numel()
        h = hidden.index_select(0, rows)
        t = _index(targets.index_select(0, rows))

        def slab_logits(start: int, stop: int, keep: bool):
            buffer = store if keep else new_output((count * (stop - start),), torch.float32, hidden.device)
            logits = buffer[:count * (stop - start)].view(count, stop - start)
            return matmul_into(logits, h, weight[start:stop].t())

        slabs = [(start, min(vocab, start + columns)) for start in range(0, vocab, columns)]
        segments_of_slab = [_Segments(count, start, stop, bias is not None, t) for start, stop in slabs]
        parts = []
        for (start, stop), segments in zip(slabs, segments_of_slab):
            state = _initial_row_state(("row_max", "sum_excl", "target_logit"), count * segments.count, hidden.device)
            _softmax_update(state, options, hidden, vocab, bias, segments.targets, segments.start, segments.stop,
                            segments.view(slab_logits(start, stop, start == 0)))
            parts.append({name: values.view(count, segments.count).t() for name, values in state.items()})
        result = merge_vocabulary_parts(*(torch.cat([part[name] for part in parts])
                                          for name in ("row_max", "sum_excl", "target_logit")), vocab=vocab)
        logp[rows] = result.logp
        if token_gradient is None:
            continue
        grad = _float32(token_gradient(rows, result.logp))
        lse, miss = _float32(result.lse), _float32(result.miss)

        rows_gradient = None
        if need_hidden and columns < vocab:
            rows_gradient = torch.zeros(count, width, dtype=torch.float32, device=hidden.device)
        for (start, stop), segments in zip(slabs, segments_of_slab):
            logits = store[:count * (stop - start)].view(count, stop - start) if start == 0 \
                else slab_logits(start, stop, keep=False)
            dz = dz_scratch[:count * (stop - start)].view(count, stop - start)
            _logit_gradient(segments.view(dz), *(segments.repeat(value) for value in (lse, miss, grad)), None, None,
                            need_bias, options, hidden, vocab, bias, segments.targets, segments.start, segments.stop,
                            segments.view(logits))
            if need_weight:
                if index == 0:
                    matmul_into(d_weight[start:stop], dz.t(), h)
                else:
                    add_matmul_float32(d_weight[start:stop], dz.t(), h)
            if need_bias:
                d_bias[start:stop] += logits.sum(dim=0)  # the unrounded dz, over the logits
            if rows_gradient is not None:
                add_matmul_float32(rows_gradient, dz, weight[start:stop])
        if need_hidden:
            if rows_gradient is None:
                rows_gradient = matmul_into(new_output((count, width), hidden.dtype, hidden.device), dz, weight)
            d_hidden.index_copy_(0, rows, rows_gradient.to(hidden.dtype))

    return (
        logp,
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got tensors on a {device.type} device"
    if not torch.cuda.is_available():
        return ("fastpref._C is built, but torch sees no CUDA device (no GPU or driver, or a "
                "CPU-only build of torch)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"the CUDA kernels need compute capability {MIN_COMPUTE_CAPABILITY[0]}."
                f"{MIN_COMPUTE_CAPABILITY[1]} or newer (sm_80+); {device} has "
                f"{capability[0]}.{capability[1]}")
    return None


BACKEND = Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=5,
    native_devices=("cuda",),
    forward_backward_by_groups=forward_backward_by_groups,
)
