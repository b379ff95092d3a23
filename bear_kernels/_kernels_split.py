"""Split-V forward of the BEAR loss: a row's vocabulary read by several programs, then merged.

When the rows alone would leave most SMs idle, bear_kernels._triton cuts each row into spans of
`span` tokens (a multiple of BLOCK_V). `_bear_span_kernel`, one program per (row, span), runs
the forward loop of bear_kernels._kernels over its span and writes partial statistics: the
span's max m2 (base-2 units), its scaled sum s = Σ exp2(t - m2), and its K = max(B, 2) best
(value, index) slots. `_bear_merge_kernel`, one program per row, merges them:
m2 = max_k m2_k, s = Σ_k s_k · exp2(m2_k - m2), and the K best of all spans' slots taken best
first (highest value, then lowest index; spans hold disjoint tokens, so the order is the
unsplit kernel's). It finishes the row exactly as the unsplit forward does and, for the fused
loss, writes the gradient's coefficients (a, c_y, c_b) for the backward kernel, launched on the
same (row, span) grid.
"""

import triton
import triton.language as tl

from ._kernels import (
    LOG2E,
    _finish_row,
    _fused_coefficients,
    _scan_span,
    _store_row,
    _target_in_set,
)


@triton.jit
def _bear_span_kernel(
    part_m_ptr,  # (N, S) out, COMPUTE: the span's max of t = z·log2(e)/tau (-inf: none)
    part_s_ptr,  # (N, S) out, COMPUTE: Σ exp2(t - m2) over the span
    part_v_ptr,  # (N, S, BEAM_PAD) out, COMPUTE: slot values, -inf where not a real token
    part_i_ptr,  # (N, S, BEAM_PAD) out, int32: slot indices (>= V: not a real token)
    logits_ptr,  # (N, V) in: z, unit stride along V
    counted_ptr,  # (N,) in, bool: y != ignore_index and |A| > 1 (uncounted rows read nothing)
    mask_ptr,  # (N, W) in, int32 bitmask of A (unused when HAS_MASK is False)
    V,  # vocabulary size
    span,  # tokens per span (a multiple of BLOCK_V)
    stride_z,  # row stride of logits (elements)
    stride_m,  # row stride of the mask (words)
    inv_tau: tl.float64,  # 1 / tau
    beam_width_in,  # B
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BEAM_PAD: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    inv_tau = tl.full([], inv_tau, COMPUTE)  # fp64 argument, rounded once (_bear_fwd_kernel)
    row = tl.program_id(0)
    part = row * tl.num_programs(1) + tl.program_id(1)
    lo = tl.program_id(1) * span
    hi = tl.where(tl.load(counted_ptr + row), tl.minimum(lo + span, V), lo)
    m2, s, buf_v, buf_i = _scan_span(
        logits_ptr + row.to(tl.int64) * stride_z,
        mask_ptr + row.to(tl.int64) * stride_m,
        lo,
        hi,
        V,
        inv_tau * LOG2E,
        beam_width_in,
        HAS_MASK,
        BLOCK_V,
        BEAM_PAD,
        COMPUTE,
    )
    slot = part * BEAM_PAD + tl.arange(0, BEAM_PAD)
    tl.store(part_m_ptr + part, m2)
    tl.store(part_s_ptr + part, s)
    tl.store(part_v_ptr + slot, tl.where(buf_i < V, buf_v, float("-inf")))
    tl.store(part_i_ptr + slot, buf_i)


@triton.jit
def _bear_merge_kernel(
    ce_ptr,  # (N,) out, COMPUTE: ce = lse - x_y, 0 on uncounted rows
    margin_ptr,  # (N,) out, COMPUTE: Δ = x_b - x_y, 0 on uncounted rows
    lse_ptr,  # (N,) out, COMPUTE: logsumexp over A of z / tau (0 on uncounted rows)
    b_ptr,  # (N,) out, int32: threshold index b, -1 uncounted, V counted without a slot
    a_ptr,  # (N,) out, COMPUTE: coefficient of p_j (FUSED_GRAD only)
    cy_ptr,  # (N,) out, COMPUTE: subtracted at j = y (FUSED_GRAD only)
    cb_ptr,  # (N,) out, COMPUTE: added at j = b (FUSED_GRAD only)
    part_m_ptr,  # (N, S) in: from _bear_span_kernel
    part_s_ptr,  # (N, S) in
    part_v_ptr,  # (N, S, BEAM_PAD) in
    part_i_ptr,  # (N, S, BEAM_PAD) in
    logits_ptr,  # (N, V) in: z (x_y and x_b are reloaded)
    target_ptr,  # (N,) in, int64: y
    counted_ptr,  # (N,) in, bool: y != ignore_index and |A| > 1 (counted_rows)
    mask_ptr,  # (N, W) in, int32 bitmask of A: the target's word only (unused without HAS_MASK)
    scale_ptr,  # () in, COMPUTE: d(loss)/d(row loss) of a counted row (FUSED_GRAD only)
    V,  # vocabulary size
    n_spans,  # S
    stride_z,  # row stride of logits (elements)
    stride_m,  # row stride of the mask (words)
    inv_tau: tl.float64,  # 1 / tau
    beam_width_in,  # B
    reg_weight: tl.float64,  # λ (FUSED_GRAD only)
    inv_xi: tl.float64,  # 1 / ξ (FUSED_GRAD only)
    HAS_MASK: tl.constexpr,  # False: A = the whole vocabulary
    SPAN_PAD: tl.constexpr,  # next power of two >= S
    BEAM_PAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    FUSED_GRAD: tl.constexpr,  # write (a, c_y, c_b) of the reduced loss
    THRESHOLD_GRAD: tl.constexpr,  # β differentiable (FUSED_GRAD only)
):
    inv_tau = tl.full([], inv_tau, COMPUTE)  # fp64 arguments, rounded once (_bear_fwd_kernel)
    reg_weight = tl.full([], reg_weight, COMPUTE)
    inv_xi = tl.full([], inv_xi, COMPUTE)
    row = tl.program_id(0)
    neg_inf = float("-inf")
    span = tl.arange(0, SPAN_PAD)
    used = span < n_spans
    # 2. lse over the spans: the largest max, each sum rescaled to it
    part_m = tl.load(part_m_ptr + row * n_spans + span, mask=used, other=neg_inf)
    part_s = tl.load(part_s_ptr + row * n_spans + span, mask=used, other=0.0)
    m2 = tl.max(part_m, 0)
    m_safe = tl.where(m2 == neg_inf, 0.0, m2)
    s = tl.sum(part_s * tl.exp2(part_m - m_safe), 0)
    # 4. the K best real slots of all spans, best first: (n_real = min(K, n'), best, worst)
    cell = (row * n_spans + span[:, None]) * BEAM_PAD + tl.arange(0, BEAM_PAD)[None, :]
    cand_i = tl.load(part_i_ptr + cell, mask=used[:, None], other=V)
    live = cand_i < V
    cand_v = tl.load(part_v_ptr + cell, mask=live, other=neg_inf)
    n_real = tl.zeros([], tl.int32)
    top_i = V
    low_i = V
    for _ in range(0, tl.maximum(beam_width_in, 2)):
        best_v = tl.max(tl.max(tl.where(live, cand_v, neg_inf), 1), 0)
        best_i = tl.min(tl.min(tl.where(live & (cand_v == best_v), cand_i, V), 1), 0)
        found = best_i < V
        n_real += found.to(tl.int32)
        top_i = tl.where(found & (n_real == 1), best_i, top_i)
        low_i = tl.where(found, best_i, low_i)
        live = live & ((cand_v < best_v) | ((cand_v == best_v) & (cand_i > best_i)))
    y64 = tl.load(target_ptr + row)
    counted = tl.load(counted_ptr + row)
    y = tl.where(counted & (y64 >= 0) & (y64 < V), y64, -1).to(tl.int32)  # -1: no target
    y = _target_in_set(mask_ptr + row.to(tl.int64) * stride_m, y, HAS_MASK)  # -1 outside A
    b, lse, ce, margin = _finish_row(
        logits_ptr + row.to(tl.int64) * stride_z,
        V,
        y,
        counted,
        m2,
        s,
        n_real,
        top_i,
        low_i,
        beam_width_in,
        inv_tau,
        COMPUTE,
    )
    _store_row(ce_ptr, margin_ptr, lse_ptr, b_ptr, row, counted, b, lse, ce, margin)
    if FUSED_GRAD:
        a, c_y, c_b = _fused_coefficients(
            counted, margin, scale_ptr, reg_weight, inv_xi, inv_tau, COMPUTE, THRESHOLD_GRAD
        )
        tl.store(a_ptr + row, a)
        tl.store(cy_ptr + row, c_y)
        tl.store(cb_ptr + row, c_b)
