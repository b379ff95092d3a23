"""Launchers of the Triton kernels and the autograd.Function of the Triton path.

Limits: V <= MAX_VOCAB, B <= MAX_BEAM, logits with unit stride along V (made contiguous
otherwise), row offsets in int64. No host synchronisation: the per-row outputs (N,) stay on the
device and the backward coefficients are computed with torch ops. CPU tensors run only under
TRITON_INTERPRET=1 (checked by bear_kernels.functional before any launch).

triton is optional: this module always imports, and HAS_TRITON says whether its paths can run
(the one place that guards the import).
"""

from __future__ import annotations

import os

import torch

from ._common import FusedParams, LossParams, bear_row_loss, counted_rows, row_coefficients

try:
    import triton
    import triton.language as tl

    from ._kernels import _bear_bwd_kernel, _bear_fwd_kernel, _scale_kernel
    from ._kernels_split import _bear_merge_kernel, _bear_span_kernel

    HAS_TRITON = True
except ImportError:  # triton is an optional dependency (setup.py extra "triton")
    HAS_TRITON = False

# Limits stated by the issue: vocabularies up to 262144 tokens, beams up to 64.
MAX_VOCAB = 262144
MAX_BEAM = 64
# Tokens per chunk on a GPU and under the interpreter. Untuned (no GPU was available): 2048 bf16
# values are one 16-byte load per thread at 8 warps, and a smaller chunk makes each entry into
# the running top-B cheaper (per token taken in, two reductions over the chunk, or one 64-bit
# max for B > 16; about B·(1 + ln(V/BLOCK_V)) tokens per row on random logits). Under the
# interpreter, numpy work per chunk makes 1024 faster.
BLOCK_V_GPU = 2048
BLOCK_V_INTERPRET = 1024
NUM_WARPS_GPU = 8
# Registers per thread, at most (ptxas's .maxnreg): three programs of NUM_WARPS_GPU warps fit an
# SM's 65,536 registers at 80 (allocated in steps of 8: at 88 two fit). Left to itself, the
# ptxas of Triton 3.6 (the device machines' version) put the masked forward kernels at 64 or 80
# registers with spilled bytes, or at 103 (benchmarks/README.md, "Spills").
MAX_REGISTERS_GPU = 80
# Split-V: with fewer rows than SPLIT_ROWS_PER_SM per SM, each row's vocabulary is cut into spans
# of at least SPLIT_MIN_CHUNKS chunks (each span fills its own top-B from scratch), read by
# separate programs and merged. CPU tensors (the interpreter) assume SM_COUNT_CPU SMs: 0, never
# split, unless a test sets it.
SPLIT_ROWS_PER_SM = 2
SPLIT_MIN_CHUNKS = 4
SM_COUNT_CPU = 0
# Rows in flight in the fused forward + gradient: None launches one program per row (about 3
# blocks of 8 warps run per SM: ~400 rows x 256 KB of bf16 at V = 128256, twice an H100's L2, so
# the gradient pass mostly re-reads from memory); k launches k programs per SM, each looping over
# rows (fewer rows in L2 at once, fewer loads in flight per SM). Untuned: `make gpu-bench`
# measures impl triton_1sm (k = 1) beside triton.
FUSED_PROGRAMS_PER_SM = None
# Warps per program of the whole-row forward (None: NUM_WARPS_GPU, chunks of BLOCK_V_GPU). Every
# token taken into the running top-B is a reduction over the chunk that each warp of the program
# executes in full, so a row read by w warps in chunks of 256·w tokens (still one 16-byte load
# per thread) issues fewer instructions for the same entries: SASS-based estimates per row in
# benchmarks/results/sass_warps_sm90.csv (benchmarks/sass_warps.py). Whether a lone warp hides
# its reductions' latency only a GPU shows: off until `make gpu-bench` (impl triton_1warp) times
# it. Split-V spans and the backward kernel keep NUM_WARPS_GPU.
FORWARD_WARPS = None


def interpreting() -> bool:
    """True when triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_v(vocab: int) -> int:
    cap = BLOCK_V_INTERPRET if interpreting() else BLOCK_V_GPU
    return min(cap, max(32, triton.next_power_of_2(vocab)))  # whole mask words per chunk


def _register_cap() -> dict:
    """{"maxnreg": MAX_REGISTERS_GPU} on CUDA; {} on ROCm, whose Triton options have no maxnreg
    (an unknown launch keyword raises)."""
    return {} if torch.version.hip else {"maxnreg": MAX_REGISTERS_GPU}


def _launch_kwargs() -> dict:
    return {} if interpreting() else {"num_warps": NUM_WARPS_GPU} | _register_cap()


def _forward_config(vocab: int) -> tuple[int, dict]:
    """(BLOCK_V, launch kwargs) of the whole-row forward: FORWARD_WARPS warps with chunks of
    256 tokens per warp where set (on a GPU), else the defaults."""
    if FORWARD_WARPS is None or interpreting():
        return _block_v(vocab), _launch_kwargs()
    block = min(256 * FORWARD_WARPS, max(32, triton.next_power_of_2(vocab)))
    return block, {"num_warps": FORWARD_WARPS} | _register_cap()


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT_CPU


def _span(n_rows: int, vocab: int, block_v: int, device) -> int:
    """Tokens per program along V: the whole row (rounded up to chunks) unless split-V applies.

    Split when N < SPLIT_ROWS_PER_SM · SMs: about that many programs in all, no span shorter
    than SPLIT_MIN_CHUNKS chunks.
    """
    chunks = triton.cdiv(vocab, block_v)
    programs = SPLIT_ROWS_PER_SM * _sm_count(device)
    splits = min(triton.cdiv(programs, max(n_rows, 1)), chunks // SPLIT_MIN_CHUNKS)
    return triton.cdiv(chunks, max(splits, 1)) * block_v


def _compute_dtype(z):
    if z.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _check_limits(z, params: LossParams):
    vocab = z.shape[1]
    if vocab > MAX_VOCAB:
        raise ValueError(
            f"logits vocabulary size must be <= {MAX_VOCAB} for impl='triton', got {vocab}; "
            "use impl='torch'"
        )
    if params.beam_width > MAX_BEAM:
        raise ValueError(
            f"beam_width must be <= {MAX_BEAM} for impl='triton', got {params.beam_width}; "
            "use impl='torch'"
        )


def _fwd(z, y, mask, counted, params: LossParams, fused_grad=None):
    """Launch the forward: per-row ce, Δ, lse (COMPUTE dtype) and b (int32); counted (N,) bool
    from counted_rows (an uncounted row is not read).

    fused_grad = (grad (N, V), scale (), FusedParams) also writes the gradient of the reduced
    BEAR loss into grad: in the same kernel (second pass over each row, right after the first),
    or, split-V, by the backward kernel from the coefficients the merge writes.
    """
    n_rows, vocab = z.shape
    tdtype, tl_dtype = _compute_dtype(z)
    ce, margin, lse = (torch.empty(n_rows, dtype=tdtype, device=z.device) for _ in range(3))
    b = torch.empty(n_rows, dtype=torch.int32, device=z.device)  # (N,)
    if n_rows == 0:
        return ce, margin, lse, b
    span = _span(n_rows, vocab, _block_v(vocab), z.device)
    if span < vocab:
        _fwd_split(z, y, mask, counted, params, fused_grad, span, (ce, margin, lse, b))
        return ce, margin, lse, b
    block_v, launch = _forward_config(vocab)
    mask_arg = mask if mask is not None else y  # any tensor; never read without HAS_MASK
    grad, scale, reg_weight, reg_temperature = _fused_args(fused_grad, z, lse)
    programs = n_rows
    if FUSED_PROGRAMS_PER_SM is not None and fused_grad is not None and _sm_count(z.device) > 0:
        programs = min(n_rows, FUSED_PROGRAMS_PER_SM * _sm_count(z.device))
    _bear_fwd_kernel[(programs,)](
        ce,
        margin,
        lse,
        b,
        z,
        y,
        counted,
        mask_arg,
        grad,
        scale,
        vocab,
        n_rows,
        z.stride(0),
        mask.stride(0) if mask is not None else 0,
        grad.stride(0),
        1.0 / params.temperature,
        params.beam_width,
        float(reg_weight),
        1.0 / reg_temperature,
        HAS_MASK=mask is not None,
        BLOCK_V=block_v,
        BEAM_PAD=_beam_pad(params),
        COMPUTE=tl_dtype,
        FUSED_GRAD=fused_grad is not None,
        THRESHOLD_GRAD=params.threshold_grad,
        ROW_LOOP=programs < n_rows,
        **launch,
    )
    return ce, margin, lse, b


def _fused_args(fused_grad, z, lse):
    """(grad, scale, reg_weight, reg_temperature) of a fused launch; placeholders otherwise
    (z and lse: tensors the kernels never read without FUSED_GRAD)."""
    if fused_grad is None:
        return z, lse, 0.0, 1.0
    grad, scale, fused = fused_grad
    return grad, scale, fused.reg_weight, fused.reg_temperature


def _beam_pad(params: LossParams) -> int:
    return max(2, triton.next_power_of_2(params.beam_width))


def _fwd_split(z, y, mask, counted, params: LossParams, fused_grad, span, outputs):
    """Split-V forward into outputs = (ce, margin, lse, b): span kernel, merge, [gradient]."""
    n_rows, vocab = z.shape
    n_spans = triton.cdiv(vocab, span)
    tdtype, tl_dtype = _compute_dtype(z)
    beam_pad = _beam_pad(params)
    part_m, part_s = (torch.empty(n_rows, n_spans, dtype=tdtype, device=z.device) for _ in "ms")
    part_v = torch.empty(n_rows, n_spans, beam_pad, dtype=tdtype, device=z.device)
    part_i = torch.empty(n_rows, n_spans, beam_pad, dtype=torch.int32, device=z.device)
    mask_arg = mask if mask is not None else y  # any tensor; never read without HAS_MASK
    stride_m = mask.stride(0) if mask is not None else 0
    _bear_span_kernel[(n_rows, n_spans)](
        part_m,
        part_s,
        part_v,
        part_i,
        z,
        counted,
        mask_arg,
        vocab,
        span,
        z.stride(0),
        stride_m,
        1.0 / params.temperature,
        params.beam_width,
        HAS_MASK=mask is not None,
        BLOCK_V=_block_v(vocab),
        BEAM_PAD=beam_pad,
        COMPUTE=tl_dtype,
        **_launch_kwargs(),
    )
    ce, margin, lse, b = outputs
    coefficients = [torch.empty_like(lse) for _ in range(3)]  # (a, c_y, c_b), fused only
    grad, scale, reg_weight, reg_temperature = _fused_args(fused_grad, z, lse)
    _bear_merge_kernel[(n_rows,)](
        ce,
        margin,
        lse,
        b,
        *coefficients,
        part_m,
        part_s,
        part_v,
        part_i,
        z,
        y,
        counted,
        mask_arg,
        scale,
        vocab,
        n_spans,
        z.stride(0),
        stride_m,
        1.0 / params.temperature,
        params.beam_width,
        float(reg_weight),
        1.0 / reg_temperature,
        HAS_MASK=mask is not None,
        SPAN_PAD=triton.next_power_of_2(n_spans),
        BEAM_PAD=beam_pad,
        COMPUTE=tl_dtype,
        FUSED_GRAD=fused_grad is not None,
        THRESHOLD_GRAD=params.threshold_grad,
    )
    if fused_grad is not None:
        _bwd_into(grad, z, y, mask, lse, b, *coefficients, params)


def _bwd(z, y, mask, lse, b, a, c_y, c_b, params: LossParams):
    """Launch the backward kernel: grad (N, V) in the logits dtype, written once."""
    grad = torch.empty_like(z)  # (N, V)
    _bwd_into(grad, z, y, mask, lse, b, a, c_y, c_b, params)
    return grad


def _bwd_into(grad, z, y, mask, lse, b, a, c_y, c_b, params: LossParams):
    """Write d(loss)/dz into grad (N, V), one program per (row, span) (see _span)."""
    n_rows, vocab = z.shape
    if n_rows == 0:
        return
    _, tl_dtype = _compute_dtype(z)
    block_v = _block_v(vocab)
    span = _span(n_rows, vocab, block_v, z.device)
    mask_arg = mask if mask is not None else y
    n_spans = triton.cdiv(vocab, span)
    _bear_bwd_kernel[(n_rows, n_spans)](
        grad,
        z,
        y,
        mask_arg,
        lse,
        b,
        a,
        c_y,
        c_b,
        vocab,
        span,
        z.stride(0),
        grad.stride(0),
        mask.stride(0) if mask is not None else 0,
        1.0 / params.temperature,
        HAS_MASK=mask is not None,
        BLOCK_V=block_v,
        COMPUTE=tl_dtype,
        THRESHOLD_GRAD=params.threshold_grad,
        SPLIT=n_spans > 1,
        **_launch_kwargs(),
    )


class _CEMarginTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams):
        counted = counted_rows(y, mask, z.shape[1], params.ignore_index)  # (N,) no sync
        ce, margin, lse, b = _fwd(z, y, mask, counted, params)
        ctx.save_for_backward(z, y, mask, lse, b)
        ctx.params = params
        ctx.mark_non_differentiable(counted)
        return ce, margin, counted

    @staticmethod
    def backward(ctx, g_ce, g_margin, _g_counted):
        z, y, mask, lse, b = ctx.saved_tensors
        # (a, c_y, c_b) per row, derived in bear_kernels._common; 0 on uncounted rows (b = -1)
        a, c_y, c_b = row_coefficients(g_ce, g_margin, b >= 0, ctx.params, lse.dtype)
        grad = _bwd(
            z, y, mask, lse, b, a.contiguous(), c_y.contiguous(), c_b.contiguous(), ctx.params
        )
        return grad, None, None, None


# Elements per program of the in-place scaling of a fused gradient.
SCALE_BLOCK = 4096


class _BEARLossTritonFused(torch.autograd.Function):
    """bear_loss with reduction sum / mean: the gradient is written by the forward kernel.

    Each row is read twice back to back (statistics, then gradient) while it is still in cache,
    instead of once in the forward and again in a separate backward (the Liger-Kernel scheme).
    The backward only scales the saved gradient by the upstream scalar g, in place, and reads
    nothing when g == 1. The saved gradient holds N·V elements of the logits dtype from the
    forward to the backward (the same memory a separate backward would allocate).
    """

    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams, fused: FusedParams):
        tdtype, _ = _compute_dtype(z)
        counted = counted_rows(y, mask, z.shape[1], params.ignore_index)  # (N,) no sync
        if fused.reduction == "mean":
            scale = 1.0 / counted.sum().clamp_min(1).to(tdtype)  # ()
        else:
            scale = torch.ones((), dtype=tdtype, device=z.device)  # ()
        grad = torch.empty_like(z)  # (N, V)
        ce, margin, _, _ = _fwd(z, y, mask, counted, params, (grad, scale, fused))
        row = bear_row_loss(ce, margin, counted, fused.reg_weight, fused.reg_temperature)  # (N,)
        ctx.save_for_backward(grad)
        ctx.used = False
        return row.sum() * scale

    @staticmethod
    def backward(ctx, g):
        if ctx.used:
            raise RuntimeError("bear_loss(impl='triton') supports one backward per forward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        g = (
            g.detach()
            .reshape(())
            .to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        )
        numel = grad.numel()
        if numel:
            _scale_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](
                grad, g.contiguous(), numel, BLOCK=SCALE_BLOCK
            )
        return grad, None, None, None, None


def _contiguous_inputs(z, y, mask, params: LossParams):
    """Check the kernels' limits; return z with unit stride along V, y and mask contiguous."""
    _check_limits(z, params)
    if z.stride(1) != 1:
        z = z.contiguous()
    y = y.contiguous()
    if mask is not None:
        mask = mask.contiguous()
    return z, y, mask


def bear_loss_triton_fused(z, y, mask, params: LossParams, fused: FusedParams):
    """Reduced BEAR loss (sum or mean) of flattened inputs, with the gradient from the forward."""
    z, y, mask = _contiguous_inputs(z, y, mask, params)
    return _BEARLossTritonFused.apply(z, y, mask, params, fused)


def ce_margin_triton(z, y, mask, params: LossParams):
    """Per-row (ce, Δ, counted) of flattened inputs z (N, V), y (N,), mask (N, W) or None."""
    z, y, mask = _contiguous_inputs(z, y, mask, params)
    return _CEMarginTriton.apply(z, y, mask, params)
