"""The fast PyTorch path of ce_margin: row chunks, native softmax kernels, a fused backward.

It serves every device (the CPU default) under the same API as the Triton kernels. Only counted
rows are computed, in chunks of rows, so the float32 temporaries are (rows_per_chunk, V), never
(N, V); the backward of ce_margin recomputes the softmax of a chunk instead of keeping it, and
bear_loss with a sum / mean reduction writes its gradient in the forward, while the chunk is in
cache (_BEARLossTorchFused, the scheme of the Triton path). lse = z_(1) - log p_(1) comes from the
softmax, which is exact to rounding because p_(1) >= 1/n. z_(B') comes from a
two-level top-k: the top-B of the maxima of groups of GROUP tokens picks B groups, and the top-B
of those groups' members is the top-B of the row (every token outside the chosen groups is at most
the B-th largest group maximum). One host synchronisation per call lists the counted rows.

The gradient of the per-row terms, d_j = a·p_j - c_y·[j=y] + c_b·[j=b], is derived above
`row_coefficients` in bear_kernels._common.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import FusedParams, LossParams, check_first_order, row_coefficients
from .bitmask import allowed_count

# Rows per chunk are chosen so that one chunk of float32 logits is about this many elements
# (4 MiB of fp32; 2^18..2^22 measured within noise of each other on CPU): per-op overhead stays
# small, temporaries stay in cache and are never (N, V).
CHUNK_ELEMENTS = 1 << 20
# On a GPU (no cache to stay in; each chunk costs ~40 kernel launches): 256 MiB of fp32, so that
# N = 8192 at V = 128256 takes 16 chunks instead of 1024 (not yet measured on a GPU).
CUDA_CHUNK_ELEMENTS = 1 << 26
# Tokens per group of the two-level top-k (a power of two; 64 measured well on CPU).
GROUP = 64
# Bit k of an int32 word is bit k % 8 of its byte k // 8 (little-endian, as every torch target).
# _BYTE_BIAS[(device, dtype)][byte] holds the 8 additive biases of a byte's bits: 0 for an allowed
# token, -inf for a masked one. Adding a gathered bias is ~5x faster on CPU than masked_fill.
_BYTE_BIAS: dict = {}


def _rows_per_chunk(vocab: int, device: torch.device) -> int:
    elements = CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _mask_bias(mask_rows: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 (R, W) bitmask -> (R, V) additive bias in dtype: 0 on A, -inf outside A.

    (A masked logit of +inf or NaN gives NaN once added; `_scaled_rows` then selects instead.)
    """
    key = (mask_rows.device, dtype)
    table = _BYTE_BIAS.get(key)
    if table is None:
        byte = torch.arange(256, device=mask_rows.device)[:, None]  # (256, 1)
        bits = (byte >> torch.arange(8, device=mask_rows.device)) & 1  # (256, 8)
        table = torch.zeros(256, 8, dtype=dtype, device=mask_rows.device)  # (256, 8)
        table.masked_fill_(bits == 0, float("-inf"))
        _BYTE_BIAS[key] = table
    as_bytes = mask_rows.contiguous().view(torch.uint8).reshape(-1).long()  # (R*4W,)
    bias = table.index_select(0, as_bytes)  # (R*4W, 8)
    return bias.reshape(mask_rows.shape[0], -1)[:, :vocab]  # (R, V)


def _kth_largest(x: torch.Tensor, beam: torch.Tensor, k: int):
    """(z_(B'), z_(1), index of z_(1)) per row of x (R, V): the beam-th and the largest value.

    beam (R,) holds B' in [1, k]; k = min(B, V). Two-level top-k when V is large (see above).
    """
    n_rows, vocab = x.shape
    full = vocab // GROUP * GROUP
    if full // GROUP > k:
        group_max = x[:, :full].reshape(n_rows, full // GROUP, GROUP).amax(-1)  # (R, V/G)
        groups = torch.topk(group_max, k, dim=-1, sorted=False).indices  # (R, k)
        members = groups[:, :, None] * GROUP + torch.arange(GROUP, device=x.device)  # (R, k, G)
        tail = torch.arange(full, vocab, device=x.device).expand(n_rows, -1)  # (R, V % G)
        where = torch.cat([members.reshape(n_rows, -1), tail], dim=1)  # (R, k*G + V % G)
        cand = x.gather(1, where)  # (R, k*G + V % G)
    else:
        where, cand = None, x
    top = torch.topk(cand, k, dim=-1, sorted=True)  # (R, k) values and positions in cand
    i_max = top.indices[:, 0] if where is None else where.gather(1, top.indices[:, :1]).squeeze(1)
    return top.values.gather(1, (beam - 1)[:, None]).squeeze(1), top.values[:, 0], i_max


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
    step = _rows_per_chunk(vocab, rows.device)
    if rows.numel() == n_rows:  # every row is counted: contiguous slices, no copies
        for s in range(0, n_rows, step):
            yield slice(s, min(s + step, n_rows)), slice(s, min(s + step, n_rows))
    else:
        for s in range(0, rows.numel(), step):
            yield rows[s : s + step], slice(s, min(s + step, rows.numel()))


def _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab, select=False):
    """Chunk of scaled logits z/tau restricted to A (R, V) in cdtype (-inf outside A).

    One pass where possible: with a mask, the fresh bias buffer takes z/tau in place (the dtype
    conversion happens inside the add). That add turns a masked +inf or NaN into NaN, so a chunk
    holding one is redone with `select=True`: masked entries are set to -inf whatever they hold
    (SPEC §2: logits outside A have no effect). Without a mask the result may be a view of z:
    callers only read it.
    """
    x = z[sel]  # (R, V)
    if mask is not None and select:
        allowed = _mask_bias(mask[sel], vocab, cdtype) == 0  # (R, V)
        return torch.where(allowed, x.to(cdtype) * inv_tau, float("-inf"))  # (R, V)
    if mask is not None:
        return _mask_bias(mask[sel], vocab, cdtype).add_(x, alpha=inv_tau)  # (R, V)
    if x.dtype != cdtype:
        x = x.to(cdtype)  # (R, V) a new tensor
        return x.mul_(inv_tau) if inv_tau != 1.0 else x
    return x * inv_tau if inv_tau != 1.0 else x


def _counted(z, y, mask, params: LossParams):
    """(n (N,), counted (N,), rows (M,)): |A|, the counted-row flags, their ids (one host sync)."""
    n_rows, vocab = z.shape
    if mask is not None:
        n_all = allowed_count(mask, vocab)  # (N,)
    else:
        n_all = torch.full((n_rows,), vocab, device=z.device)  # (N,)
    counted = (y != params.ignore_index) & (n_all > 1)  # (N,)
    return n_all, counted, counted.nonzero().squeeze(1)


def _chunk_forward(z, y, mask, sel, idx, n_all, params: LossParams, cdtype):
    """Steps 1-4 of the reference on one chunk.

    Returns (p (R, V), ce (R,), Δ (R,), b (R,) or None, select): `select` says whether the
    chunk's masked logits had to be selected away (see `_scaled_rows`); backward does the same.
    """
    vocab = z.shape[1]
    inv_tau = 1.0 / params.temperature
    # 1. scaled logits of the chunk, restricted to A
    x = _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab)  # (R, V)
    y_r = y[idx][:, None]  # (R, 1)
    # 2. z_(B') with B' = min(B, n); b only when the gradient needs it (threshold_grad)
    beam = n_all[idx].clamp(max=params.beam_width)  # (R,)
    k = min(params.beam_width, vocab)
    z_b, z_max, i_max = _kth_largest(x, beam, k)  # (R,) each
    # topk ranks NaN first, so z_(1) is NaN iff the row of x holds a NaN; with a mask that may
    # come from a masked +inf / NaN: redo the chunk by selection (one host sync, masks only).
    select = mask is not None and bool(torch.isnan(z_max).any())
    if select:
        x = _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab, select=True)  # (R, V)
        z_b, z_max, i_max = _kth_largest(x, beam, k)  # (R,) each
    b = None
    if params.threshold_grad:
        allowed = None if mask is None else _mask_bias(mask[sel], vocab, cdtype) == 0  # (R, V)
        b = _threshold_index(x, allowed, z_b, beam)  # (R,)
    # 3. p = softmax over A (native fused kernel, fast on -inf); lse = z_(1) - log p_(1),
    #    exact to rounding since p_(1) >= 1/n; ce = lse - z_y
    p = torch.softmax(x, dim=-1)  # (R, V)
    lse = z_max - torch.log(p.gather(1, i_max[:, None]).squeeze(1))  # (R,)
    z_y = x.gather(1, y_r).squeeze(1)  # (R,)
    # an allowed +inf logit: lse = +inf (softmax gives NaN there), so ce = +inf - z_y and
    # Δ = log β - log p_y = (z_(B') - lse) - (z_y - lse) is NaN, as the reference computes them
    inf_row = torch.isposinf(z_max)  # (R,)
    lse = torch.where(inf_row, z_max, lse)
    # 4. Δ = (z_(B') - z_y) / tau
    margin = torch.where(inf_row, torch.full_like(z_b, float("nan")), z_b - z_y)
    return p, lse - z_y, margin, b, select


def _write_chunk_grad(grad, sel, p, a_r, cy_r, cb_r, y_r, b_r, threshold_grad):
    """grad[sel] = a·p - c_y·[j=y] + c_b·[j=b] for one chunk; p (R, V) is consumed.

    The dense part is written straight into grad when the rows are a slice; the entries at y
    and b are then overwritten with their exact values, computed in p's dtype, rounded once.
    """
    v_y = a_r * p.gather(1, y_r).squeeze(1) - cy_r  # (R,)
    if threshold_grad:
        same = (b_r == y_r).squeeze(1)  # (R,)
        v_b = a_r * p.gather(1, b_r).squeeze(1) + cb_r  # (R,)
        v_y = torch.where(same, v_y + cb_r, v_y)
        v_b = torch.where(same, v_b - cy_r, v_b)
    if isinstance(sel, slice):
        d = torch.mul(p, a_r[:, None], out=grad[sel])  # (R, V) in the logits dtype
    else:
        d = p.mul_(a_r[:, None])  # (R, V) in cdtype, copied into grad below
    d.scatter_(1, y_r, v_y[:, None].to(d.dtype))
    if threshold_grad:
        d.scatter_(1, b_r, v_b[:, None].to(d.dtype))
    if not isinstance(sel, slice):
        grad[sel] = d.to(grad.dtype)


def _grad_buffer(z, rows):
    """(N, V) gradient in the logits dtype; rows that are not counted are 0."""
    return torch.empty_like(z) if rows.numel() == z.shape[0] else torch.zeros_like(z)


class _CEMarginTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams):
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        n_all, counted, rows = _counted(z, y, mask, params)
        ce = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        margin = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        b_idx = torch.zeros(n_rows, dtype=torch.int64, device=z.device)  # (N,)
        selected = []  # per chunk: masked logits selected away (see _scaled_rows)
        for sel, part in _chunks(rows, n_rows, vocab):
            idx = rows[part]  # (R,) row ids of this chunk
            _, ce[idx], margin[idx], b, select = _chunk_forward(
                z, y, mask, sel, idx, n_all, params, cdtype
            )
            selected.append(select)
            if b is not None:
                b_idx[idx] = b
        ctx.save_for_backward(z, y, mask, rows, b_idx, counted)
        ctx.params, ctx.selected = params, selected
        ctx.mark_non_differentiable(counted)
        return ce, margin, counted

    @staticmethod
    def backward(ctx, g_ce, g_margin, _g_counted):
        check_first_order()
        z, y, mask, rows, b_idx, counted = ctx.saved_tensors
        params = ctx.params
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        a, c_y, c_b = row_coefficients(g_ce, g_margin, counted, params, cdtype)  # (N,) each
        grad = _grad_buffer(z, rows)  # (N, V)
        for (sel, part), select in zip(_chunks(rows, n_rows, vocab), ctx.selected, strict=True):
            idx = rows[part]  # (R,)
            inv_tau = 1.0 / params.temperature
            x = _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab, select)  # (R, V)
            p = torch.softmax(x, dim=-1)  # (R, V), 0 outside A
            _write_chunk_grad(
                grad,
                sel,
                p,
                a[idx],
                c_y[idx],
                c_b[idx],
                y[idx][:, None],
                b_idx[idx][:, None],
                params.threshold_grad,
            )
        return grad, None, None, None


class _BEARLossTorchFused(torch.autograd.Function):
    """bear_loss with reduction sum / mean: the gradient is computed in the forward.

    Each chunk is converted and soft-maxed once, and its gradient written while it is in cache
    (as the Triton path does); the backward scales the saved gradient by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams, fused: FusedParams):
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        inv_tau = 1.0 / params.temperature
        reg_weight, reg_temperature = fused.reg_weight, fused.reg_temperature
        n_all, counted, rows = _counted(z, y, mask, params)
        scale = 1.0 / max(rows.numel(), 1) if fused.reduction == "mean" else 1.0
        total = torch.zeros((), dtype=cdtype, device=z.device)  # ()
        grad = _grad_buffer(z, rows)  # (N, V)
        for sel, part in _chunks(rows, n_rows, vocab):
            idx = rows[part]  # (R,)
            p, ce, margin, b, _ = _chunk_forward(z, y, mask, sel, idx, n_all, params, cdtype)
            # 5-6. row loss = ce + λ·log σ(Δ/ξ); its gradient has g_ce = scale and
            #      g_Δ = scale·(λ/ξ)·σ(-Δ/ξ) in _common's derivation
            total += (ce + reg_weight * F.logsigmoid(margin / reg_temperature)).sum()
            g_ce = torch.full_like(ce, scale)  # (R,)
            g_m = scale * (reg_weight / reg_temperature) * torch.sigmoid(-margin / reg_temperature)
            c_y = (g_ce + g_m) * inv_tau  # (R,)
            if params.threshold_grad:
                a, c_b = g_ce * inv_tau, g_m * inv_tau
            else:
                a, c_b = c_y, torch.zeros_like(c_y)
            b_r = (b if b is not None else torch.zeros_like(idx))[:, None]  # (R, 1)
            _write_chunk_grad(
                grad, sel, p, a, c_y, c_b, y[idx][:, None], b_r, params.threshold_grad
            )
        ctx.save_for_backward(grad)
        ctx.used = False
        return total * scale

    @staticmethod
    def backward(ctx, g):
        check_first_order()
        if ctx.used:
            raise RuntimeError("bear_loss(impl='torch') supports one backward per forward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if g.device.type != "cpu" or g.item() != 1.0:  # the usual loss.backward() skips this
            grad.mul_(g.to(grad.dtype))
        return grad, None, None, None, None


def ce_margin_torch(z, y, mask, params: LossParams):
    """Per-row (ce, Δ, counted) of flattened inputs z (N, V), y (N,), mask (N, W) or None."""
    return _CEMarginTorch.apply(z, y, mask, params)


def bear_loss_torch_fused(z, y, mask, params: LossParams, fused: FusedParams):
    """Reduced BEAR loss (sum or mean) of flattened inputs, with the gradient from the forward."""
    return _BEARLossTorchFused.apply(z, y, mask, params, fused)
