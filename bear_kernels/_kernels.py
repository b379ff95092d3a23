"""Triton kernels of the BEAR loss (SPEC §2): one forward pass and one backward pass per row.

@triton.jit code only; launchers and the autograd.Function are in bear_kernels._triton. Numbered
comments follow bear_kernels.reference step by step and reuse its names.

Forward, per row, reading the logits once in chunks of BLOCK_V tokens:
  - online logsumexp over A of x = z / tau (running max m and scaled sum s; a chunk whose allowed
    values are all -inf, or that has no allowed token, leaves (m, s) unchanged: exp(-inf - -inf)
    is never evaluated);
  - n = |A| from the bitmask;
  - the running top-B set as BEAM_PAD slots of (value, index), B of them active. Its worst member
    (lowest value, then highest index) is the current threshold. A chunk's tokens are taken best
    first (highest value, then lowest index) while the best beats the worst slot (greater value,
    or equal value and lower index); after the first chunks almost never, so a chunk costs one
    extra reduction (the index of its maximum), and an entering token two. Empty slots hold -inf
    with distinct indices V + slot, so every (value, index) pair is unique;
  - at the end, b and z_(B') are the worst slot whose index is < V (a real token): with n < B
    that is the n-th largest, B' = min(B, n) as in the reference.
Backward, per row: d_j = a·p_j - c_y·[j=y] + c_b·[j=b] on A, 0 outside (see bear_kernels._common
for the derivation of a, c_y, c_b), written once in the logits dtype.
"""

import triton
import triton.language as tl


@triton.jit
def _write_grad_row(
    row_g,  # pointer to the row of grad (logits dtype)
    row_z,  # pointer to the row of logits
    row_m,  # pointer to the row of the mask (unused when HAS_MASK is False)
    V,  # vocabulary size
    v_read,  # V on a counted row, 0 on an uncounted row (then nothing is read, zeros written)
    y,  # target index
    b,  # threshold index (-1 on an uncounted row)
    lse,  # logsumexp over A of z / tau
    a,  # coefficient of p_j
    c_y,  # subtracted at j = y
    c_b,  # added at j = b
    inv_tau,  # 1 / tau
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """d_j = a · p_j - c_y · [j = y] + c_b · [j = b] on A, 0 outside A; one write per token."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        in_v = idx < V
        keep = idx < v_read
        if HAS_MASK:
            word = tl.load(row_m + idx // 32, mask=keep, other=0)
            keep = keep & (((word >> (idx % 32)) & 1) != 0)
        x = tl.load(row_z + idx, mask=keep, other=0.0).to(COMPUTE) * inv_tau
        d = tl.where(keep, a * tl.exp(x - lse), 0.0)
        d = tl.where((idx == y) & (b >= 0), d - c_y, d)
        d = tl.where((idx == b) & (b >= 0), d + c_b, d)
        tl.store(row_g + idx, d.to(row_g.dtype.element_ty), mask=in_v)


@triton.jit
def _bear_fwd_kernel(
    ce_ptr,  # (N,) out, COMPUTE: ce = lse - x_y, 0 on uncounted rows
    margin_ptr,  # (N,) out, COMPUTE: Δ = x_b - x_y, 0 on uncounted rows
    lse_ptr,  # (N,) out, COMPUTE: logsumexp over A of z / tau (0 on uncounted rows)
    b_ptr,  # (N,) out, int32: threshold index b, -1 on uncounted rows
    logits_ptr,  # (N, V) in: z, fp32 / bf16 / fp16 / fp64, unit stride along V
    target_ptr,  # (N,) in, int64: y
    mask_ptr,  # (N, W) in, int32 bitmask of A (unused when HAS_MASK is False)
    grad_ptr,  # (N, V) out, logits dtype: d(loss)/dz when FUSED_GRAD (else unused)
    scale_ptr,  # () in, COMPUTE: d(loss)/d(row loss) of a counted row, 1 or 1/#counted
    V,  # vocabulary size
    stride_z,  # row stride of logits (elements)
    stride_m,  # row stride of the mask (words)
    stride_g,  # row stride of grad (elements)
    inv_tau,  # 1 / tau
    ignore_index,  # target value of unsupervised rows
    beam_width,  # B
    reg_weight,  # λ (FUSED_GRAD only)
    inv_xi,  # 1 / ξ (FUSED_GRAD only)
    HAS_MASK: tl.constexpr,  # False: A = the whole vocabulary
    BLOCK_V: tl.constexpr,  # tokens per chunk (power of two)
    BEAM_PAD: tl.constexpr,  # next power of two >= B (slots of the running top-B)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    FUSED_GRAD: tl.constexpr,  # also write the gradient of the reduced BEAR loss (2nd pass)
    THRESHOLD_GRAD: tl.constexpr,  # β differentiable (FUSED_GRAD only)
):
    row = tl.program_id(0).to(tl.int64)
    row_z = logits_ptr + row * stride_z
    row_m = mask_ptr + row * stride_m
    y = tl.load(target_ptr + row)
    supervised = y != ignore_index
    v_end = tl.where(supervised, V, 0)  # an ignored row reads nothing
    offs = tl.arange(0, BLOCK_V)
    slot = tl.arange(0, BEAM_PAD)
    active = slot < beam_width
    neg_inf = float("-inf")

    # running statistics: max m, scaled sum s, count n, top-B slots (value, index)
    m = tl.full([], neg_inf, COMPUTE)
    s = tl.zeros([], COMPUTE)
    n = tl.zeros([], tl.int32)
    buf_v = tl.full([BEAM_PAD], neg_inf, COMPUTE)
    buf_i = V + slot  # distinct sentinel indices >= V
    worst_v = tl.min(tl.where(active, buf_v, float("inf")), 0)
    worst_i = tl.max(tl.where(active & (buf_v == worst_v), buf_i, -1), 0)
    no_index = V + BEAM_PAD  # above every real and sentinel index: never beats a slot

    for start in range(0, v_end, BLOCK_V):
        idx = start + offs
        in_v = idx < V
        # 1. x = z / tau on A (-inf elsewhere), loaded in the input dtype, maths in COMPUTE
        x = tl.load(row_z + idx, mask=in_v, other=0.0).to(COMPUTE) * inv_tau
        if HAS_MASK:
            word = tl.load(row_m + idx // 32, mask=in_v, other=0)
            allowed = in_v & (((word >> (idx % 32)) & 1) != 0)
        else:
            allowed = in_v
        n += tl.sum(allowed.to(tl.int32), 0)
        xa = tl.where(allowed, x, neg_inf)
        # 2. online logsumexp; m_safe keeps a chunk of only -inf from computing -inf - -inf
        chunk_max = tl.max(xa, 0)
        m_new = tl.maximum(m, chunk_max)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(xa - m_safe), 0)
        m = m_new
        # 4. running top-B: the chunk's allowed tokens are taken best first (highest value,
        #    then lowest index) while the best one beats the worst slot. Usually none does, at
        #    the cost of one reduction: the chunk maximum is the logsumexp's.
        cand = allowed
        best_v = chunk_max
        best_i = tl.min(tl.where(cand & (x == best_v), idx, no_index), 0)
        while (best_v > worst_v) | ((best_v == worst_v) & (best_i < worst_i)):
            is_worst = active & (buf_v == worst_v) & (buf_i == worst_i)
            buf_v = tl.where(is_worst, best_v, buf_v)
            buf_i = tl.where(is_worst, best_i, buf_i)
            worst_v = tl.min(tl.where(active, buf_v, float("inf")), 0)
            worst_i = tl.max(tl.where(active & (buf_v == worst_v), buf_i, -1), 0)
            cand = cand & (idx != best_i)
            best_v = tl.max(tl.where(cand, x, neg_inf), 0)
            best_i = tl.min(tl.where(cand & (x == best_v), idx, no_index), 0)

    # 4. z_(B') and b: the worst slot holding a real token (index < V)
    real = active & (buf_i < V)
    x_b = tl.min(tl.where(real, buf_v, float("inf")), 0)
    b = tl.max(tl.where(real & (buf_v == x_b), buf_i, -1), 0)
    # 2-3. lse and ce = lse - x_y; the target logit is one scalar load
    counted = supervised & (n > 1)
    y_safe = tl.where(counted & (y >= 0) & (y < V), y, 0)
    x_y = tl.load(row_z + y_safe).to(COMPUTE) * inv_tau
    lse = m + tl.log(tl.where(s == 0.0, 1.0, s))  # s = 0 only when m = -inf; NaN stays NaN
    ce = lse - x_y
    # 5. Δ = x_b - x_y = log β - log p_y
    margin = x_b - x_y
    tl.store(ce_ptr + row, tl.where(counted, ce, 0.0))
    tl.store(margin_ptr + row, tl.where(counted, margin, 0.0))
    tl.store(lse_ptr + row, tl.where(counted, lse, 0.0))
    tl.store(b_ptr + row, tl.where(counted, b, -1))

    if FUSED_GRAD:
        # 6. gradient of the reduced loss, written while the row is still in cache.
        #    row loss = ce + λ·log σ(Δ/ξ): d/dce = 1, d/dΔ = (λ/ξ)·σ(-Δ/ξ); times the
        #    reduction's scale, these are the g_ce, g_Δ of bear_kernels._torch's derivation.
        scale = tl.load(scale_ptr).to(COMPUTE)
        g_ce = tl.where(counted, scale, 0.0)
        sig = 1.0 / (1.0 + tl.exp(margin * inv_xi))  # σ(-Δ/ξ)
        g_m = tl.where(counted, g_ce * reg_weight * inv_xi * sig, 0.0)
        c_y = (g_ce + g_m) * inv_tau
        if THRESHOLD_GRAD:
            a = g_ce * inv_tau
            c_b = g_m * inv_tau
        else:
            a = c_y
            c_b = g_m * 0.0
        _write_grad_row(
            grad_ptr + row * stride_g,
            row_z,
            row_m,
            V,
            tl.where(counted, V, 0),
            y,
            tl.where(counted, b, -1),
            tl.where(counted, lse, 0.0),
            a,
            c_y,
            c_b,
            inv_tau,
            HAS_MASK,
            BLOCK_V,
            COMPUTE,
        )


@triton.jit
def _bear_bwd_kernel(
    grad_ptr,  # (N, V) out, logits dtype: d(loss)/dz
    logits_ptr,  # (N, V) in: z
    target_ptr,  # (N,) in, int64: y
    mask_ptr,  # (N, W) in, int32 bitmask of A (unused when HAS_MASK is False)
    lse_ptr,  # (N,) in, COMPUTE: from the forward
    b_ptr,  # (N,) in, int32: threshold index, -1 on uncounted rows
    a_ptr,  # (N,) in, COMPUTE: coefficient of p_j
    cy_ptr,  # (N,) in, COMPUTE: subtracted at j = y
    cb_ptr,  # (N,) in, COMPUTE: added at j = b
    V,  # vocabulary size
    stride_z,  # row stride of logits (elements)
    stride_g,  # row stride of grad (elements)
    stride_m,  # row stride of the mask (words)
    inv_tau,  # 1 / tau
    HAS_MASK: tl.constexpr,  # False: A = the whole vocabulary
    BLOCK_V: tl.constexpr,  # tokens per chunk (power of two)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    row = tl.program_id(0).to(tl.int64)
    row_z = logits_ptr + row * stride_z
    row_g = grad_ptr + row * stride_g
    row_m = mask_ptr + row * stride_m
    b = tl.load(b_ptr + row)
    skip = b < 0  # uncounted row: write zeros, read nothing
    y = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    c_y = tl.load(cy_ptr + row)
    c_b = tl.load(cb_ptr + row)
    _write_grad_row(
        row_g,
        row_z,
        row_m,
        V,
        tl.where(skip, 0, V),
        y,
        b,
        lse,
        a,
        c_y,
        c_b,
        inv_tau,
        HAS_MASK,
        BLOCK_V,
        COMPUTE,
    )


@triton.jit
def _scale_kernel(
    grad_ptr,  # (numel,) in/out: the gradient, scaled in place
    g_ptr,  # () in: the upstream gradient of the loss
    numel,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    """grad *= g, reading and writing nothing when g == 1 (the usual loss.backward())."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr)  # in the compute dtype (fp32, or fp64 for fp64 logits)
    todo = idx < tl.where(g != 1.0, numel, 0)  # nothing to do when g == 1
    x = tl.load(grad_ptr + idx, mask=todo, other=0.0)
    tl.store(grad_ptr + idx, (x.to(g.dtype) * g).to(grad_ptr.dtype.element_ty), mask=todo)
