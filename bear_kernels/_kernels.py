"""Triton kernels of the BEAR loss (SPEC §2): one forward pass and one backward pass per row.

@triton.jit code only; launchers and the autograd.Function are in bear_kernels._triton. Numbered
comments follow bear_kernels.reference step by step and reuse its names.

Forward, per row, reading the logits once in chunks of BLOCK_V tokens, each a (BLOCK_V/32, 32)
tile whose rows are mask words (a word loaded once, its bits expanded in registers; the logits
loaded with 128-bit loads, a zero word skipping its 32):
  - online logsumexp over A in base-2 units t = z·log2(e)/tau (running max m2, per-position
    scaled sums s added up after the loop; exp2 with the scale folded into one multiply; a chunk
    whose allowed values are all -inf leaves them unchanged: exp2(-inf - -inf) is never taken;
    with a mask, an allowed -inf logit counts as the lowest finite value, so -inf marks exactly
    the tokens outside A, and a row whose allowed logits are all -inf gets lse = -inf);
  - the running top-K set, K = max(B, 2), as BEAM_PAD slots of (value, index). Its worst member
    (lowest value, then highest index) is the current threshold. Only a chunk whose maximum
    reaches the worst slot and, with a mask, that holds an allowed token is searched (a trie
    step's mask leaves most chunks empty): its tokens are taken best first (highest value, then
    lowest index) while the best beats the worst slot (greater value, or equal value and lower
    index). Empty slots hold -inf with distinct indices V + slot, so every pair is unique; the
    padding slots past K hold +inf, never the worst (no slot predicate is kept live). From
    KEY_SLOTS slots on (B > 16, fp32 compute) the search runs on packed int64 keys (value,
    then lower index: _order_key), one max per token instead of two reductions;
  - at the end, the real slots (index < V) number min(K, n'), n' the allowed tokens whose logit
    is not NaN (a NaN never enters the slots); b is the worst real slot (the best one when
    B = 1): the B'-th largest, B' = min(B, n) as in the reference, and z_b is reloaded from
    memory.
Which rows count comes in (counted_rows: the target is not ignored and the mask's popcount is
above 1); an uncounted row reads nothing. Hostile rows get the reference's values at per-row
scalar cost (`_finish_row`): Δ is NaN where lse is not finite (an allowed NaN, +inf, or every
allowed logit -inf), a counted row with fewer than two real slots (its allowed logits NaN but
at most one) has lse = NaN and, without a real slot, b = V (no token), and a counted target
outside A (validate_target=False) reads as z_y = -inf (ce = Δ = +inf) and has no -c_y term
(`_target_in_set`: one mask word per row).
Split-V (bear_kernels._kernels_split) runs the same loop over spans of a row and merges them.
Backward, per row or per span: d_j = a·p_j - c_y·[j=y] + c_b·[j=b] on A, 0 outside (see
bear_kernels._common for the derivation of a, c_y, c_b), written once in the logits dtype; the
fused gradient pass reads the row backwards, from the chunks the forward pass read last.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _load_chunk(row_z, row_m, start, limit, HAS_MASK: tl.constexpr, WORDS: tl.constexpr):
    """Tokens start .. start + 32·WORDS as a (WORDS, 32) tile: (idx, z, allowed).

    One row of the tile is one mask word, loaded once, its bits from `limit` on cleared (one
    shift pair per word instead of an index compare per token), and expanded in registers; the
    logits are loaded whole (128-bit loads), with the words that are zero or past `limit`
    skipping theirs. z is 0 where it was not loaded; allowed = idx < limit and the token's bit
    is set.
    """
    word_idx = start // 32 + tl.arange(0, WORDS)  # (WORDS,)
    idx = word_idx[:, None] * 32 + tl.arange(0, 32)[None, :]  # (WORDS, 32) int32
    allowed = idx < limit
    if HAS_MASK:
        word = tl.load(row_m + word_idx, mask=word_idx * 32 < limit, other=0)  # (WORDS,)
        cut = tl.minimum(tl.maximum(word_idx * 32 + 32 - limit, 0), 31)
        word = ((word << cut).to(tl.uint32, bitcast=True) >> cut).to(tl.int32, bitcast=True)
        z = tl.load(row_z + idx, mask=allowed & (word[:, None] != 0), other=0.0)
        allowed = (word[:, None] & (1 << tl.arange(0, 32))[None, :]) != 0
    else:
        z = tl.load(row_z + idx, mask=allowed, other=0.0)
    return idx, z, allowed


@triton.jit
def _lowest(COMPUTE: tl.constexpr):
    """The lowest finite value of COMPUTE (fp32 or fp64)."""
    if COMPUTE == tl.float64:
        return tl.full([], -1.7976931348623157e308, tl.float64)
    else:
        return tl.full([], -3.4028234663852886e38, tl.float32)


@triton.jit
def _write_grad_span(
    row_g,  # pointer to the row of grad (logits dtype)
    row_z,  # pointer to the row of logits
    row_m,  # pointer to the row of the mask (unused when HAS_MASK is False)
    lo,  # first token of the span (a multiple of BLOCK_V)
    hi,  # end of the span (<= V; a span of a whole number of chunks ends at hi or V)
    V,  # vocabulary size
    v_read,  # V on a counted row, 0 on an uncounted row (then nothing is read, zeros written)
    y,  # target index (int32; -1 on an uncounted row or outside A: no -c_y term)
    b,  # threshold index (int32; -1 on an uncounted row)
    lse,  # logsumexp over A of z / tau
    a,  # coefficient of p_j
    c_y,  # subtracted at j = y
    c_b,  # added at j = b (read only when HAS_CB)
    inv_tau,  # 1 / tau
    HAS_MASK: tl.constexpr,
    HAS_CB: tl.constexpr,  # c_b may be non-zero (threshold_grad)
    BLOCK_V: tl.constexpr,
    COMPUTE: tl.constexpr,
    REVERSE: tl.constexpr,  # last chunk first (the forward pass just read it: still in cache)
):
    """d_j = a · p_j - c_y · [j = y] + c_b · [j = b] on A, 0 outside A, for j in lo .. hi.

    p_j = exp(z_j / tau - lse) = exp2(z_j · log2(e) / tau - lse · log2(e)): one FMA and one ex2.
    """
    scale2 = inv_tau * LOG2E
    lse2 = lse * LOG2E
    last = lo + (tl.cdiv(hi - lo, BLOCK_V) - 1) * BLOCK_V
    for start in range(lo, hi, BLOCK_V):
        if REVERSE:
            start = last - (start - lo)
        idx, z, keep = _load_chunk(row_z, row_m, start, v_read, HAS_MASK, BLOCK_V // 32)
        d = tl.where(keep, a * tl.exp2(z.to(COMPUTE) * scale2 - lse2), 0.0)
        d = tl.where(idx == y, d - c_y, d)
        if HAS_CB:
            d = tl.where(idx == b, d + c_b, d)
        tl.store(row_g + idx, d.to(row_g.dtype.element_ty), mask=idx < V)


# below every key of a token or slot: a token outside A never enters the running top-B
NO_KEY = tl.constexpr(-(2**63))
# slots (BEAM_PAD) from which the running top-B runs on packed keys (B > 16), fp32 only
KEY_SLOTS = tl.constexpr(32)


@triton.jit
def _order_key(t, idx, allowed):
    """int64 keys ordered as (t, then lower idx): one max finds the best (value, index) pair.

    High 32 bits: t's fp32 bits made order-preserving as an int32 (a negative value becomes
    minus its magnitude, so -0 and +0 are equal), INT32_MIN where not allowed (below -inf);
    low 32 bits: INT32_MAX - idx, zero-extended.
    """
    bits = t.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = tl.where(allowed, tl.where(bits < 0, -(bits & 0x7FFFFFFF), bits), -(2**31))
    low = (0x7FFFFFFF - idx).to(tl.uint32, bitcast=True).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def _key_value(key):
    """The fp32 value t of an _order_key key."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, (-ordered) | (-(2**31)), ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _max2(x):
    return tl.max(tl.max(x, 1), 0)


@triton.jit
def _min2(x):
    return tl.min(tl.min(x, 1), 0)


@triton.jit
def _enter_pairs(t, idx, allowed, chunk_max, buf_v, buf_i, worst_v, worst_i, no_index):
    """Top-B entry on (value, index) pairs: (buf_v, buf_i, worst_v, worst_i) after the chunk.

    The next candidate is the best token ranked after the one that just entered (two chunk
    reductions per token: max value, then lowest index at it), so the loop carries scalars.
    """
    best_v = chunk_max
    best_i = _min2(tl.where(allowed & (t == best_v), idx, no_index))
    while (best_v > worst_v) | ((best_v == worst_v) & (best_i < worst_i)):
        is_worst = (buf_v == worst_v) & (buf_i == worst_i)
        buf_v = tl.where(is_worst, best_v, buf_v)
        buf_i = tl.where(is_worst, best_i, buf_i)
        worst_v = tl.min(buf_v, 0)
        worst_i = tl.max(tl.where(buf_v == worst_v, buf_i, -1), 0)
        after = allowed & ((t < best_v) | ((t == best_v) & (idx > best_i)))
        best_v = _max2(tl.where(after, t, float("-inf")))
        best_i = _min2(tl.where(after & (t == best_v), idx, no_index))
    return buf_v, buf_i, worst_v, worst_i


@triton.jit
def _enter_keys(t, idx, allowed, buf_k, worst_k):
    """Top-B entry on packed keys (_order_key): (buf_k, worst_k) after the chunk.

    One 64-bit max over the chunk per token (the best key below the one that just entered) and
    one min over the slots; building the keys costs more per chunk entered than the pairs' first
    reduction, so it pays from KEY_SLOTS slots on (many tokens per chunk entered, wide slots).
    """
    keys = _order_key(t, idx, allowed)
    best_k = _max2(keys)
    while best_k > worst_k:
        buf_k = tl.where(buf_k == worst_k, best_k, buf_k)
        worst_k = tl.min(buf_k, 0)
        best_k = _max2(tl.where(keys < best_k, keys, NO_KEY))
    return buf_k, worst_k


@triton.jit
def _scan_span(
    row_z,  # pointer to the row of logits
    row_m,  # pointer to the row of the mask (unused when HAS_MASK is False)
    lo,  # first token (a multiple of BLOCK_V)
    hi,  # end of the span (<= V; lo when nothing is read)
    V,  # vocabulary size
    scale2,  # log2(e) / tau
    beam_width_in,  # B
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BEAM_PAD: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Steps 1, 2 and 4 of the reference over tokens lo .. hi: (m2, s, buf_v, buf_i).

    m2 = max of t = z·log2(e)/tau over the span's allowed tokens (with a mask, an allowed -inf
    counts as the lowest finite value), s = Σ exp2(t - m2) (0 when m2 = -inf), (buf_v, buf_i)
    the span's K = max(B, 2) best (value, index) slots: real slots have index < V, empty ones
    (-inf, V + slot), padding ones past K (+inf, V + slot).
    """
    slot = tl.arange(0, BEAM_PAD)
    neg_inf = float("-inf")
    lowest = _lowest(COMPUTE)
    # running statistics, in base-2 units t: max m2, scaled sums s (per tile position, summed
    # after the loop), top-K slots (value, index) with K = max(B, 2) of the allowed tokens whose
    # logit is not NaN
    m2 = tl.full([], neg_inf, COMPUTE)
    s = tl.zeros([BLOCK_V // 32, 32], COMPUTE)
    # K = max(B, 2) slots start empty at -inf; the slots past K hold +inf, never the worst
    buf_v = tl.where(slot < tl.maximum(beam_width_in, 2), neg_inf, float("inf")).to(COMPUTE)
    buf_i = V + slot  # distinct sentinel indices >= V
    worst_v = tl.min(buf_v, 0)
    worst_i = tl.max(tl.where(buf_v == worst_v, buf_i, -1), 0)
    buf_k = _order_key(buf_v, buf_i, True)  # the same slots as keys (KEY_SLOTS or more)
    worst_k = tl.min(buf_k, 0)

    for start in range(lo, hi, BLOCK_V):
        # 1. t = z · log2(e) / tau on A (-inf elsewhere), loaded in the input dtype
        idx, z, allowed = _load_chunk(row_z, row_m, start, V, HAS_MASK, BLOCK_V // 32)
        #    With a mask, an allowed -inf becomes the lowest finite value (NaN stays NaN), so
        #    that t > -inf exactly on A and a chunk without allowed tokens is never searched
        #    (its maximum is -inf); _finish_row turns an m2 at that value back into -inf.
        if HAS_MASK:
            t = z.to(COMPUTE) * scale2
            t = tl.where(allowed, tl.maximum(t, lowest, tl.PropagateNan.ALL), neg_inf)
        else:
            t = tl.where(allowed, z.to(COMPUTE) * scale2, neg_inf)
        # 2. online logsumexp; m_safe keeps a chunk of only -inf from computing -inf - -inf
        chunk_max = _max2(t)
        m_new = tl.maximum(m2, chunk_max)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        s = s * tl.exp2(m2 - m_safe) + tl.exp2(t - m_safe)
        m2 = m_new
        # 4. running top-B: the chunk's allowed tokens are taken best first (highest value,
        #    then lowest index) while the best one beats the worst slot (greater value, or equal
        #    value and lower index). Entered only when the chunk maximum reaches the worst slot
        #    (after the first chunks almost never) and, with a mask, the chunk holds an allowed
        #    token: a sparse mask (a trie step allows a few tokens) leaves the slots empty, and
        #    an empty chunk would otherwise be searched. `allowed` is recomputed here rather
        #    than kept from step 1 (eight predicates live across the loop cost 10 P2R moves).
        if (chunk_max >= worst_v) & (not HAS_MASK or chunk_max > neg_inf):
            #    A NaN never enters: the pairs compare it false, but a key would rank it above
            #    +inf (_finish_row makes the lse of a row with an allowed NaN NaN)
            if HAS_MASK:
                allowed = t > neg_inf
            else:
                allowed = (idx < V) & (t == t)
            if (BEAM_PAD >= KEY_SLOTS) and (COMPUTE == tl.float32):
                buf_k, worst_k = _enter_keys(t, idx, allowed, buf_k, worst_k)
                worst_v = _key_value(worst_k)
            else:
                buf_v, buf_i, worst_v, worst_i = _enter_pairs(
                    t, idx, allowed, chunk_max, buf_v, buf_i, worst_v, worst_i, V + BEAM_PAD
                )
    if (BEAM_PAD >= KEY_SLOTS) and (COMPUTE == tl.float32):
        buf_v = _key_value(buf_k)
        buf_i = 0x7FFFFFFF - (buf_k & 0x7FFFFFFF).to(tl.int32)
    return m2, tl.sum(tl.sum(s, 1), 0), buf_v, buf_i


@triton.jit
def _target_in_set(row_m, y, HAS_MASK: tl.constexpr):
    """y where the target lies in A (its bit in the row's mask: one word load), else -1.

    A counted target outside A gets past the argument checks only with validate_target=False;
    the reference masks z_y to -inf before reading it, so p_y = 0 (ce = Δ = +inf) and its
    gradient at y is 0: y = -1 gives both (_finish_row, _write_grad_span). y = -1 stays -1.
    """
    if HAS_MASK:
        safe = tl.maximum(y, 0)
        word = tl.load(row_m + safe // 32)
        y = tl.where(((word >> (safe % 32)) & 1) != 0, y, -1)
    return y


@triton.jit
def _finish_row(row_z, V, y, counted, m2, s, n_real, top_i, low_i, beam_width_in, inv_tau, COMPUTE):
    """Steps 2-5 from the merged statistics: (b, lse, ce, margin).

    y: the target, -1 where it is not a token of A (_target_in_set; then x_y = -inf, as the
    reference's masked z_y). counted: the row is supervised and n = |A| > 1 (counted_rows, from
    the mask's popcount). n_real = min(K, n') real slots, n' the allowed tokens whose logit is
    not NaN (a NaN never enters the slots), top_i / low_i the best / worst of them. b is the
    worst real slot (the best one when B = 1): the B'-th largest, B' = min(B, n) as in the
    reference; the target and threshold logits are scalar loads. A counted row with fewer than
    two real slots has NaN for every allowed logit but at most one: its lse is NaN, as the
    reference's, and without a real slot b = V (no token's index).
    """
    b = tl.where(beam_width_in == 1, top_i, low_i)
    b = tl.where(n_real > 0, b, V)
    x_y = tl.load(row_z + tl.maximum(y, 0)).to(COMPUTE) * inv_tau
    x_y = tl.where(y >= 0, x_y, float("-inf"))
    x_b = tl.load(row_z + tl.where(counted & (n_real > 0), b, 0)).to(COMPUTE) * inv_tau
    # m2 is the lowest finite value when every allowed logit is -inf (_scan_span): lse = -inf
    # (so is a row whose largest t is finite and exactly that value: z·log2(e)/tau = -FLT_MAX)
    m2 = tl.where(m2 == _lowest(COMPUTE), float("-inf"), m2)
    lse = (m2 + tl.log2(tl.where(s == 0.0, 1.0, s))) * LN2  # s = 0: m2 = -inf (no allowed token)
    # an allowed +inf logit: s is NaN (inf - inf), lse = +inf (an allowed NaN: m2 skips it, s
    # and lse are NaN), as the reference's
    lse = tl.where(m2 == float("inf"), float("inf"), lse)
    lse = tl.where(n_real > 1, lse, float("nan"))  # read only on counted rows (see above)
    # 3. ce = lse - x_y (+inf for a target outside A); 5. Δ = x_b - x_y = log β - log p_y,
    #    which the reference computes as (x_b - lse) - (x_y - lse): NaN wherever lse is not
    #    finite (an allowed NaN or +inf, or no finite allowed logit), whatever x_b and x_y
    margin = tl.where(tl.abs(lse) < float("inf"), x_b - x_y, float("nan"))
    return b, lse, lse - x_y, margin


@triton.jit
def _store_row(ce_ptr, margin_ptr, lse_ptr, b_ptr, row, counted, b, lse, ce, margin):
    """The per-row outputs, 0 (b: -1) on uncounted rows."""
    tl.store(ce_ptr + row, tl.where(counted, ce, 0.0))
    tl.store(margin_ptr + row, tl.where(counted, margin, 0.0))
    tl.store(lse_ptr + row, tl.where(counted, lse, 0.0))
    tl.store(b_ptr + row, tl.where(counted, b, -1))


@triton.jit
def _fused_coefficients(
    counted, margin, scale_ptr, reg_weight, inv_xi, inv_tau, COMPUTE, THRESHOLD_GRAD
):
    """(a, c_y, c_b) of the reduced loss's gradient (0 on uncounted rows).

    row loss = ce + λ·log σ(Δ/ξ): d/dce = 1, d/dΔ = (λ/ξ)·σ(-Δ/ξ); times the reduction's scale,
    these are the g_ce, g_Δ of bear_kernels._common's derivation.
    """
    scale = tl.load(scale_ptr).to(COMPUTE)
    g_ce = tl.where(counted, scale, 0.0)
    sig = 1.0 / (1.0 + tl.exp(margin * inv_xi))  # σ(-Δ/ξ)
    g_m = tl.where(counted, g_ce * reg_weight * inv_xi * sig, 0.0)
    c_y = (g_ce + g_m) * inv_tau
    if THRESHOLD_GRAD:
        # + 0·g_m: NaN where g_m is not finite, as the reference's p_j terms of Δ, which cancel
        a = (g_ce + 0.0 * g_m) * inv_tau
    else:
        a = c_y
    return a, c_y, g_m * inv_tau


@triton.jit
def _bear_fwd_kernel(
    ce_ptr,  # (N,) out, COMPUTE: ce = lse - x_y, 0 on uncounted rows
    margin_ptr,  # (N,) out, COMPUTE: Δ = x_b - x_y, 0 on uncounted rows
    lse_ptr,  # (N,) out, COMPUTE: logsumexp over A of z / tau (0 on uncounted rows)
    b_ptr,  # (N,) out, int32: threshold index b, -1 uncounted, V counted without a slot
    logits_ptr,  # (N, V) in: z, fp32 / bf16 / fp16 / fp64, unit stride along V
    target_ptr,  # (N,) in, int64: y
    counted_ptr,  # (N,) in, bool: y != ignore_index and |A| > 1 (counted_rows)
    mask_ptr,  # (N, W) in, int32 bitmask of A (unused when HAS_MASK is False)
    grad_ptr,  # (N, V) out, logits dtype: d(loss)/dz when FUSED_GRAD (else unused)
    scale_ptr,  # () in, COMPUTE: d(loss)/d(row loss) of a counted row, 1 or 1/#counted
    V,  # vocabulary size
    n_rows,  # N (read only when ROW_LOOP)
    stride_z,  # row stride of logits (elements)
    stride_m,  # row stride of the mask (words)
    stride_g,  # row stride of grad (elements)
    inv_tau: tl.float64,  # 1 / tau
    beam_width_in,  # B
    reg_weight: tl.float64,  # λ (FUSED_GRAD only)
    inv_xi: tl.float64,  # 1 / ξ (FUSED_GRAD only)
    HAS_MASK: tl.constexpr,  # False: A = the whole vocabulary
    BLOCK_V: tl.constexpr,  # tokens per chunk (power of two, >= 32)
    BEAM_PAD: tl.constexpr,  # next power of two >= B (slots of the running top-B)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    FUSED_GRAD: tl.constexpr,  # also write the gradient of the reduced BEAR loss (2nd pass)
    THRESHOLD_GRAD: tl.constexpr,  # β differentiable (FUSED_GRAD only)
    ROW_LOOP: tl.constexpr,  # fewer programs than rows: program p takes rows p, p + grid, ...
):
    # the float arguments arrive as fp64 (their annotation) and are rounded to COMPUTE once: a
    # Python float argument is otherwise fp32, and float64 logits would get an fp32 log2(e)/tau
    inv_tau = tl.full([], inv_tau, COMPUTE)
    reg_weight = tl.full([], reg_weight, COMPUTE)
    inv_xi = tl.full([], inv_xi, COMPUTE)
    if not ROW_LOOP:
        _bear_fwd_row(ce_ptr, margin_ptr, lse_ptr, b_ptr, logits_ptr, target_ptr, counted_ptr,
                      mask_ptr, grad_ptr, scale_ptr, tl.program_id(0), V, stride_z, stride_m,
                      stride_g, inv_tau, beam_width_in, reg_weight, inv_xi,
                      HAS_MASK, BLOCK_V, BEAM_PAD, COMPUTE, FUSED_GRAD, THRESHOLD_GRAD)  # fmt: skip
    else:
        # fewer rows in flight (bear_kernels._triton.FUSED_PROGRAMS_PER_SM): the fused gradient
        # pass may then find its row still in L2
        first, programs = tl.program_id(0), tl.num_programs(0)
        for i in range(0, tl.cdiv(n_rows - first, programs)):
            row = first + i * programs
            _bear_fwd_row(ce_ptr, margin_ptr, lse_ptr, b_ptr, logits_ptr, target_ptr,
                          counted_ptr, mask_ptr, grad_ptr, scale_ptr, row, V, stride_z, stride_m,
                          stride_g, inv_tau, beam_width_in, reg_weight, inv_xi,
                          HAS_MASK, BLOCK_V, BEAM_PAD, COMPUTE, FUSED_GRAD,
                          THRESHOLD_GRAD)  # fmt: skip


@triton.jit
def _bear_fwd_row(
    ce_ptr, margin_ptr, lse_ptr, b_ptr, logits_ptr, target_ptr, counted_ptr, mask_ptr, grad_ptr,
    scale_ptr, row, V, stride_z, stride_m, stride_g, inv_tau, beam_width_in, reg_weight, inv_xi,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, BEAM_PAD: tl.constexpr,
    COMPUTE: tl.constexpr, FUSED_GRAD: tl.constexpr, THRESHOLD_GRAD: tl.constexpr,
):  # fmt: skip
    """One row of _bear_fwd_kernel (its arguments, the row's index in place of n_rows)."""
    row_z = logits_ptr + row.to(tl.int64) * stride_z
    row_m = mask_ptr + row.to(tl.int64) * stride_m
    counted = tl.load(counted_ptr + row)
    v_end = tl.where(counted, V, 0)  # an uncounted row (ignored, or n = 1): read nothing
    scale2 = inv_tau * LOG2E  # t = z · log2(e) / tau: exp(x - c) = exp2(t - c · log2(e))
    m2, s, buf_v, buf_i = _scan_span(
        row_z, row_m, 0, v_end, V, scale2, beam_width_in, HAS_MASK, BLOCK_V, BEAM_PAD, COMPUTE
    )
    # the target is read again here rather than kept in registers across the loop
    y64 = tl.load(target_ptr + row)
    y = tl.where(counted & (y64 >= 0) & (y64 < V), y64, -1).to(tl.int32)  # -1: no target
    y = _target_in_set(row_m, y, HAS_MASK)  # -1 also outside A (validate_target=False)
    # 4. the real slots (index < V) number min(K, n'), n' the allowed logits not NaN; their
    #    best and worst
    real = buf_i < V
    n_real = tl.sum(real.to(tl.int32), 0)
    low_v = tl.min(tl.where(real, buf_v, float("inf")), 0)
    low_i = tl.max(tl.where(real & (buf_v == low_v), buf_i, -1), 0)
    top_v = tl.max(tl.where(real, buf_v, float("-inf")), 0)
    top_i = tl.min(tl.where(real & (buf_v == top_v), buf_i, V), 0)
    b, lse, ce, margin = _finish_row(
        row_z, V, y, counted, m2, s, n_real, top_i, low_i, beam_width_in, inv_tau, COMPUTE
    )
    _store_row(ce_ptr, margin_ptr, lse_ptr, b_ptr, row, counted, b, lse, ce, margin)

    if FUSED_GRAD:
        # 6. gradient of the reduced loss, written while the row is still in cache, last chunk
        #    first (the forward pass read it last)
        a, c_y, c_b = _fused_coefficients(
            counted, margin, scale_ptr, reg_weight, inv_xi, inv_tau, COMPUTE, THRESHOLD_GRAD
        )
        _write_grad_span(
            grad_ptr + row.to(tl.int64) * stride_g,
            row_z,
            row_m,
            0,
            V,
            V,
            tl.where(counted, V, 0),
            tl.where(counted, y, -1),
            tl.where(counted, b, -1),
            tl.where(counted, lse, 0.0),
            a,
            c_y,
            c_b,
            inv_tau,
            HAS_MASK,
            THRESHOLD_GRAD,
            BLOCK_V,
            COMPUTE,
            True,
        )


@triton.jit
def _bear_bwd_kernel(
    grad_ptr,  # (N, V) out, logits dtype: d(loss)/dz
    logits_ptr,  # (N, V) in: z
    target_ptr,  # (N,) in, int64: y
    mask_ptr,  # (N, W) in, int32 bitmask of A (unused when HAS_MASK is False)
    lse_ptr,  # (N,) in, COMPUTE: from the forward
    b_ptr,  # (N,) in, int32: threshold index, -1 on uncounted rows (V: none, never matched)
    a_ptr,  # (N,) in, COMPUTE: coefficient of p_j
    cy_ptr,  # (N,) in, COMPUTE: subtracted at j = y
    cb_ptr,  # (N,) in, COMPUTE: added at j = b
    V,  # vocabulary size
    span,  # tokens per program along V when SPLIT (a multiple of BLOCK_V; grid (N, cdiv(V, span)))
    stride_z,  # row stride of logits (elements)
    stride_g,  # row stride of grad (elements)
    stride_m,  # row stride of the mask (words)
    inv_tau: tl.float64,  # 1 / tau
    HAS_MASK: tl.constexpr,  # False: A = the whole vocabulary
    BLOCK_V: tl.constexpr,  # tokens per chunk (power of two)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    THRESHOLD_GRAD: tl.constexpr,  # c_b may be non-zero (else it is not read)
    SPLIT: tl.constexpr,  # split-V: program (row, k) writes tokens k·span .. (k + 1)·span
):
    inv_tau = tl.full([], inv_tau, COMPUTE)  # fp64 argument, rounded once (_bear_fwd_kernel)
    row = tl.program_id(0)
    row_m = mask_ptr + row.to(tl.int64) * stride_m
    if SPLIT:
        lo = tl.program_id(1) * span
        hi = tl.minimum(lo + span, V)
    else:
        lo = 0
        hi = V
    b = tl.load(b_ptr + row)
    skip = b < 0  # uncounted row: write zeros, read nothing
    y = tl.load(target_ptr + row)
    y = tl.where(skip | (y < 0) | (y >= V), -1, y).to(tl.int32)
    y = _target_in_set(row_m, y, HAS_MASK)  # a target outside A: no -c_y (0 at y)
    c_b = tl.load(cb_ptr + row) if THRESHOLD_GRAD else 0.0
    _write_grad_span(
        grad_ptr + row.to(tl.int64) * stride_g,
        logits_ptr + row.to(tl.int64) * stride_z,
        row_m,
        lo,
        hi,
        V,
        tl.where(skip, 0, V),
        y,
        b,
        tl.load(lse_ptr + row),
        tl.load(a_ptr + row),
        tl.load(cy_ptr + row),
        c_b,
        inv_tau,
        HAS_MASK,
        THRESHOLD_GRAD,
        BLOCK_V,
        COMPUTE,
        False,
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
