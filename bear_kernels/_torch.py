"""The fast PyTorch path of ce_margin: row chunks, native softmax kernels, a fused backward.

It serves every device (the CPU default) under the same API as the Triton kernels. Only counted
rows are computed, in chunks of rows, so the float32 temporaries are (rows_per_chunk, V), never
(N, V); the backward recomputes the softmax of a chunk instead of keeping it. z_(B') comes from a
two-level top-k: the top-B of the maxima of groups of GROUP tokens picks B groups, and the top-B
of those groups' members is the top-B of the row (every token outside the chosen groups is at most
the B-th largest group maximum). One host synchronisation per call lists the counted rows.

Gradient of the per-row terms (the derivation shared with bear_kernels._triton). For j in A,
log p_j = z_j/tau - lse, lse = logsumexp_{k in A} z_k/tau, so d(log p_y)/dz_j = ([j=y] - p_j)/tau:

    ce = -log p_y                     dce/dz_j = (p_j - [j=y]) / tau
    Δ = log β - log p_y, β constant   dΔ/dz_j  = (p_j - [j=y]) / tau    (threshold_grad=False)
    Δ = (z_b - z_y) / tau             dΔ/dz_j  = ([j=b] - [j=y]) / tau  (threshold_grad=True)

With upstream gradients g_ce, g_Δ of one row, the logits gradient is therefore

    d_j = a · p_j - c_y · [j=y] + c_b · [j=b]   for j in A, 0 outside A, with
    a = (g_ce + g_Δ) / tau,  c_y = (g_ce + g_Δ) / tau,  c_b = 0           (threshold_grad=False)
    a = g_ce / tau,          c_y = (g_ce + g_Δ) / tau,  c_b = g_Δ / tau   (threshold_grad=True)

and a = c_y = c_b = 0 on rows that are not counted. `row_coefficients` computes (a, c_y, c_b).
"""

from __future__ import annotations

import torch

from .functional import LossParams

# Rows per chunk are chosen so that one chunk of float32 logits is about this many elements
# (16 MiB): large enough to amortise per-op overhead, small enough to stay out of N×V temporaries.
CHUNK_ELEMENTS = 1 << 22
# Tokens per group of the two-level top-k (a power of two; 64 measured well on CPU).
GROUP = 64
# Bit k of an int32 word is bit k % 8 of its byte k // 8 (little-endian, as every torch target).
_BYTE_SHIFTS = tuple(range(8))


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _unpack(mask_rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 (R, W) bitmask -> bool (R, V), through uint8 so that no int32 (R, V) is built."""
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.uint8, device=mask_rows.device)  # (8,)
    as_bytes = mask_rows.contiguous().view(torch.uint8)  # (R, 4W)
    bits = (as_bytes[..., None] >> shifts) & 1  # (R, 4W, 8)
    return bits.reshape(mask_rows.shape[0], -1)[:, :vocab].bool()  # (R, V)


def _kth_largest(x: torch.Tensor, beam: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_(B'), z_(1)) per row of x (R, V): the beam-th and the 1st largest value.

    beam (R,) holds B' in [1, k]; k = min(B, V). Two-level top-k when V is large (see above).
    """
    n_rows, vocab = x.shape
    full = vocab // GROUP * GROUP
    if full // GROUP > k:
        group_max = x[:, :full].reshape(n_rows, full // GROUP, GROUP).amax(-1)  # (R, V/G)
        groups = torch.topk(group_max, k, dim=-1, sorted=False).indices  # (R, k)
        members = groups[:, :, None] * GROUP + torch.arange(GROUP, device=x.device)  # (R, k, G)
        cand = x.gather(1, members.reshape(n_rows, -1))  # (R, k*G)
        cand = torch.cat([cand, x[:, full:]], dim=1)  # (R, k*G + V % G)
    else:
        cand = x
    top = torch.topk(cand, k, dim=-1, sorted=True).values  # (R, k)
    return top.gather(1, (beam - 1)[:, None]).squeeze(1), top[:, 0]


def row_coefficients(g_ce, g_margin, counted, params: LossParams, dtype):
    """(a, c_y, c_b), each (N,), of the gradient d_j = a·p_j - c_y·[j=y] + c_b·[j=b] (see above)."""
    inv_tau = 1.0 / params.temperature
    keep = counted.to(dtype)
    g_ce = torch.zeros_like(keep) if g_ce is None else g_ce.to(dtype) * keep
    g_margin = torch.zeros_like(keep) if g_margin is None else g_margin.to(dtype) * keep
    c_y = (g_ce + g_margin) * inv_tau
    if params.threshold_grad:
        return g_ce * inv_tau, c_y, g_margin * inv_tau
    return c_y, c_y, torch.zeros_like(c_y)


def _threshold_index(scaled, allowed, z_b, beam):
    """Index b of the B'-th largest allowed value with ties to the lower index (SPEC §2).

    torch.topk's order among equal values is unspecified, so b is recomputed: with g values
    strictly above z_(B'), b is the (B' - g)-th allowed occurrence of the value z_(B').
    Only needed (and only run) with threshold_grad=True.
    """
    above = (scaled > z_b[:, None]).sum(-1)  # (R,)
    equal = scaled == z_b[:, None]  # (R, V)
    if allowed is not None:
        equal &= allowed
    occurrence = equal.cumsum(-1)  # (R, V)
    hit = equal & (occurrence == (beam - above)[:, None])  # (R, V)
    return hit.to(torch.uint8).argmax(-1)  # (R,)


def _chunks(rows: torch.Tensor, n_rows: int, vocab: int):
    """Yield (slice or index tensor) chunks of the counted rows."""
    step = _rows_per_chunk(vocab)
    if rows.numel() == n_rows:  # every row is counted: contiguous slices, no copies
        for s in range(0, n_rows, step):
            yield slice(s, min(s + step, n_rows)), slice(s, min(s + step, n_rows))
    else:
        for s in range(0, rows.numel(), step):
            yield rows[s : s + step], slice(s, min(s + step, rows.numel()))


def _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab):
    """Chunk of scaled logits z/tau restricted to A (R, V) in cdtype, and the bool mask (or None).

    May be a view of z: callers only read it.
    """
    x = z[sel].to(cdtype)  # (R, V)
    if inv_tau != 1.0:
        x = x * inv_tau
    allowed = None
    if mask is not None:
        allowed = _unpack(mask[sel], vocab)  # (R, V)
        x = x.masked_fill(~allowed, float("-inf"))
    return x, allowed


class _CEMarginTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams):
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        inv_tau = 1.0 / params.temperature
        # 0. counted rows: target != ignore_index and n = |A| > 1 (popcount of the bitmask)
        if mask is not None:
            from .functional import allowed_count

            n_all = allowed_count(mask, vocab)  # (N,)
        else:
            n_all = torch.full((n_rows,), vocab, device=z.device)  # (N,)
        counted = (y != params.ignore_index) & (n_all > 1)  # (N,)
        rows = counted.nonzero().squeeze(1)  # (M,) the one host sync
        ce = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        margin = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        b_idx = torch.zeros(n_rows, dtype=torch.int64, device=z.device)  # (N,)
        k = min(params.beam_width, vocab)
        for sel, part in _chunks(rows, n_rows, vocab):
            idx = rows[part]  # (R,) row ids of this chunk
            # 1. scaled logits of the chunk, restricted to A
            x, allowed = _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab)  # (R, V)
            yc = y[idx][:, None]  # (R, 1)
            # 2. z_(B') with B' = min(B, n), and the row maximum
            beam = n_all[idx].clamp(max=params.beam_width)  # (R,)
            z_b, z_max = _kth_largest(x, beam, k)  # (R,), (R,)
            if params.threshold_grad:
                b_idx[idx] = _threshold_index(x, allowed, z_b, beam)
            # 3. log p = log_softmax over A (native fused kernel); ce = -log p_y
            z_y = x.gather(1, yc).squeeze(1)  # (R,)
            log_p = torch.log_softmax(x, dim=-1)  # (R, V)
            log_p_y = log_p.gather(1, yc).squeeze(1)  # (R,)
            # 4. Δ = (z_(B') - z_y) / tau
            ce[idx] = -log_p_y
            margin[idx] = z_b - z_y
        ctx.save_for_backward(z, y, mask, rows, b_idx, counted)
        ctx.params = params
        ctx.mark_non_differentiable(counted)
        return ce, margin, counted

    @staticmethod
    def backward(ctx, g_ce, g_margin, _g_counted):
        z, y, mask, rows, b_idx, counted = ctx.saved_tensors
        params = ctx.params
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        inv_tau = 1.0 / params.temperature
        a, c_y, c_b = row_coefficients(g_ce, g_margin, counted, params, cdtype)  # (N,) each
        if rows.numel() == n_rows:
            grad = torch.empty_like(z)  # (N, V) in the logits dtype
        else:
            grad = torch.zeros_like(z)  # (N, V); uncounted rows stay 0
        for sel, part in _chunks(rows, n_rows, vocab):
            idx = rows[part]  # (R,)
            x, _ = _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab)  # (R, V)
            # d_j = a · p_j on A (p = 0 outside A), then the sparse terms at y and b
            p = torch.softmax(x, dim=-1)  # (R, V)
            if isinstance(sel, slice) and z.dtype == cdtype:
                d = torch.mul(p, a[idx, None], out=grad[sel])  # written in place: no copy
            else:
                d = p.mul_(a[idx, None])  # fp32 maths, rounded once below
            d.scatter_add_(1, y[idx][:, None], -c_y[idx, None])
            if params.threshold_grad:
                d.scatter_add_(1, b_idx[idx][:, None], c_b[idx, None])
            if d.data_ptr() != grad[sel].data_ptr():
                grad[sel] = d.to(grad.dtype)
        return grad, None, None, None


def ce_margin_torch(z, y, mask, params: LossParams):
    """Per-row (ce, Δ, counted) of flattened inputs z (N, V), y (N,), mask (N, W) or None."""
    return _CEMarginTorch.apply(z, y, mask, params)
