"""The fast PyTorch path of ce_margin: row chunks, native softmax kernels, a fused backward.

It serves every device (the CPU default) under the same API as the Triton kernels. Only counted
rows are computed, in chunks of rows, so the float32 temporaries are (rows_per_chunk, V), never
(N, V), and they are buffers of the call that every chunk reuses (`_Workspace`). When every
counted row allows few tokens (at most V / SPARSE_RATIO: a trie's allowed sets, a node's
children), the chunks work on those tokens only (`_sparse_rows`): (R, K) gathers, no (R, V)
float32 pass. Without a mask, every row's top-B, Δ and gradient coefficients come from a pass
before the chunks (`_unmasked_terms`), which then only soft-max and write. The backward of
ce_margin recomputes the softmax of a chunk instead of keeping it, and bear_loss with a sum /
mean reduction writes its gradient in the forward, while the chunk is in cache
(_BEARLossTorchFused, the scheme of the Triton path). lse = z_(1) - log p_(1) comes from the
softmax, which is exact to rounding because p_(1) >= 1/n. z_(B') comes from a two-level top-k:
the top-B of the maxima of groups of GROUP tokens picks B groups, and the top-B of those groups'
members is the top-B of the row (every token outside the chosen groups is at most the B-th
largest group maximum). Host synchronisations: one per call lists the counted rows; with a mask,
one reads the widest allowed set, and each chunk has one more (a dense chunk's NaN check, a
sparse chunk's `nonzero`), free on the CPU, the device this path is built for. Hostile rows
get the reference's values: an allowed NaN or +inf makes Δ NaN (`_margin`), and a target outside
A (validate_target=False) a zero gradient (`_target_in_set`).

The gradient of the per-row terms, d_j = a·p_j - c_y·[j=y] + c_b·[j=b], is derived above
`row_coefficients` in bear_kernels._common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import FusedParams, LossParams, check_first_order, row_coefficients
from .bitmask import BITS_PER_WORD, allowed_count

# Rows per chunk are chosen so that one chunk of float32 logits is about this many elements
# (4 MiB of fp32; 2^18..2^22 measured within noise of each other on CPU): per-op overhead stays
# small, temporaries stay in cache and are never (N, V).
CHUNK_ELEMENTS = 1 << 20
# On a GPU (no cache to stay in; each chunk costs ~40 kernel launches): 256 MiB of fp32, so that
# N = 8192 at V = 128256 takes 16 chunks instead of 1024 (not yet measured on a GPU).
CUDA_CHUNK_ELEMENTS = 1 << 26
# A chunk holds at most 1/WORKSPACE_SHARE of the logits' elements, so that its float32 buffer
# (one on the CPU, where the softmax overwrites its input) adds at most 4/32 bytes per logit to
# the call's peak: the gradient (the logits' size) is then nearly all the memory the loss adds.
WORKSPACE_SHARE = 32
# Tokens per group of the two-level top-k (a power of two; 64 measured well on CPU).
GROUP = 64
# A chunk is sparse when its rows allow at most V // SPARSE_RATIO tokens each: its allowed logits
# are gathered (R, K) and its gradient rows are zeros plus a scatter, instead of (R, V) float32
# passes (a trie's allowed sets, a node's children, are a few hundred of tens of thousands).
SPARSE_RATIO = 16
SPARSE_ROWS = 8
# Per device: each byte's set-bit positions and count (`_byte_bits`), for sparse chunks.
_BYTE_BITS: dict = {}
# Bit k of an int32 word is bit k % 8 of its byte k // 8 (little-endian, as every torch target).
# _BYTE_BIAS[(device, dtype)][byte] holds the 8 additive biases of a byte's bits: 0 for an allowed
# token, -inf for a masked one. Adding a gathered bias is ~5x faster on CPU than masked_fill.
_BYTE_BIAS: dict = {}


class _Workspace:
    """The chunk buffers of one call, reused by every chunk.

    A fresh (R, V) float32 temporary per chunk and op is a few MiB: glibc maps blocks of that
    size afresh on every allocation, so each one page-faults its memory in again (on this
    project's 2-core VM that was a third of the bf16 loss's time).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of that shape and dtype (contents undefined), the same memory every call."""
        numel = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._flat[name] = buf
        return buf[:numel].view(shape)


@dataclass
class _Chunk:
    """Rows of one chunk: ``sel`` indexes z (a slice when every row is counted), ``part`` the
    chunk's entries of the counted-row list; ``width`` K when the chunk is sparse (its rows allow
    at most K tokens), else None."""

    sel: slice | torch.Tensor
    part: slice
    width: int | None

    def row_ids(self, device: torch.device) -> torch.Tensor:
        """(R,) int64 the chunk's rows of z."""
        if isinstance(self.sel, slice):
            return torch.arange(self.sel.start, self.sel.stop, device=device)
        return self.sel


@dataclass
class _Probs:
    """softmax over A of one chunk: dense p (R, V); or sparse p (R, K) over the token ids
    tok (R, K) (ascending; padding entries have p = 0 and the row's target as token)."""

    p: torch.Tensor
    tok: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # (R, K) sparse: the entries that are tokens of A

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """(R,) the probability of token t (R,) of each row; 0 for a token outside A."""
        if self.tok is None:
            return self.p.gather(1, t[:, None]).squeeze(1)
        # a padding hit adds p = 0; where, not a product: a NaN p elsewhere (an allowed +inf,
        # `_posinf_probs_`) must not reach this token's
        return torch.where(self.tok == t[:, None], self.p, 0.0).sum(1)


def _rows_per_chunk(width: int, device: torch.device, logits: int | None = None) -> int:
    """Rows of a chunk whose rows hold ``width`` elements each; with ``logits`` (N·V, the logits'
    element count), few enough that the chunk stays within 1/WORKSPACE_SHARE of them, so its
    float32 buffer stays within 1/16 of bf16 logits (1/32 of float32 ones) on small inputs."""
    elements = CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    if logits is not None:
        elements = min(elements, logits // WORKSPACE_SHARE)
    return max(1, elements // max(width, 1))


def _mask_bias(
    mask_rows: torch.Tensor, vocab: int, dtype: torch.dtype, ws: _Workspace | None = None
) -> torch.Tensor:
    """int32 (R, W) bitmask -> (R, V) additive bias in dtype: 0 on A, -inf outside A (in the
    workspace's buffer "x" when one is given).

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
    as_bytes = mask_rows.contiguous().view(torch.uint8).reshape(-1).int()  # (R*4W,)
    out = None if ws is None else ws.take("x", (as_bytes.shape[0], 8), dtype)
    bias = torch.index_select(table, 0, as_bytes, out=out)  # (R*4W, 8)
    return bias.view(mask_rows.shape[0], -1)[:, :vocab]  # (R, V)


def _group_view(x: torch.Tensor) -> torch.Tensor:
    """(N, V // GROUP, GROUP) the groups of x's rows (a view when x is contiguous along V)."""
    full = x.shape[1] // GROUP * GROUP
    if x.stride(1) == 1:
        return x.as_strided((x.shape[0], full // GROUP, GROUP), (x.stride(0), GROUP, 1))
    return x[:, :full].reshape(x.shape[0], full // GROUP, GROUP)


def _kth_largest(x: torch.Tensor, beam: torch.Tensor, k: int, rows=None, inv_tau=None,
                 group_max=None):  # fmt: skip
    """(z_(B'), z_(1), index of z_(1)) per row: the beam-th and the largest value.

    x (R, V) scaled logits; or, with ``rows`` (R,) and ``inv_tau``, raw logits (N, V) of which
    those rows are read: the group maxima in x's own dtype, the candidates converted to float32
    (float64 for float64 logits) and scaled by 1/τ (a conversion and a scaling by a positive
    constant keep the order, so the top-k is the same); ``group_max`` (R, V // GROUP) those
    rows' group maxima when already computed. beam (R,) holds B' in [1, k]; k = min(B, V).
    Two-level top-k when V is large (see above).
    """
    vocab = x.shape[1]
    full = vocab // GROUP * GROUP
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
    if full // GROUP > k:
        grouped = _group_view(x)  # (N, V/G, G)
        if group_max is None:
            group_max = pick(grouped.amax(-1))  # (R, V/G)
        n_rows = group_max.shape[0]
        groups = torch.topk(group_max, k, dim=-1, sorted=False).indices  # (R, k)
        src = torch.arange(n_rows, device=x.device) if rows is None else rows  # (R,) rows of x
        cand = grouped[src[:, None], groups].reshape(n_rows, k * GROUP)  # (R, k*G) their tokens
        if full < vocab:
            cand = torch.cat([cand, x[src, full:]], dim=1)  # (R, k*G + V % G) and the tail
    else:
        groups, cand = None, pick(x)
    if inv_tau is not None:
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cand = cand.to(cdtype) * inv_tau
    top = torch.topk(cand, k, dim=-1, sorted=True)  # (R, k) values and positions in cand
    i_max = top.indices[:, 0]  # (R,) a position in cand
    if groups is not None:  # back to a token: its group's first token + the offset, or the tail
        kg = k * GROUP
        group = groups.gather(1, (i_max // GROUP).clamp(max=k - 1)[:, None]).squeeze(1)
        i_max = torch.where(i_max < kg, group * GROUP + i_max % GROUP, full + i_max - kg)
    return top.values.gather(1, (beam - 1)[:, None]).squeeze(1), top.values[:, 0], i_max


@dataclass
class _RowTerms:
    """Steps 2 and 4 of the reference for the counted rows (M,) each: z_(B'), z_(1) and its
    index, B', z_y and Δ (NaN where z_(1) is not finite, as the reference: `_margin`)."""

    z_b: torch.Tensor
    z_max: torch.Tensor
    i_max: torch.Tensor
    beam: torch.Tensor
    z_y: torch.Tensor
    margin: torch.Tensor


def _margin(z_b: torch.Tensor, z_y: torch.Tensor, z_max: torch.Tensor) -> torch.Tensor:
    """(R,) Δ = z_(B') - z_y of scaled logits; NaN on a row whose z_(1) is not finite.

    The reference computes Δ = (z_(B') - lse) - (z_y - lse): an allowed NaN or +inf makes lse NaN
    or +inf, so its Δ is NaN, while z_(B') - z_y alone stays finite when neither is that logit
    (B' > 1; topk ranks NaN first). (z_(1) = -inf: every allowed logit is -inf, NaN either way.)
    """
    return torch.where(torch.isfinite(z_max), z_b - z_y, float("nan"))


def _unmasked_terms(z, y, rows, n_all, params: LossParams, cdtype) -> _RowTerms:
    """_RowTerms of every counted row when there is no mask (A = the vocabulary), before the
    chunks: z's group maxima in its own dtype and a gather of the chosen groups, in blocks of
    rows whose candidates are no more elements than a chunk, so the row chunks that follow only
    soft-max (no per-chunk top-k, no per-chunk row arithmetic). z must be row-contiguous
    (stride 1 along V)."""
    inv_tau = 1.0 / params.temperature
    n_rows, vocab = z.shape
    beam = n_all[rows].clamp(max=params.beam_width)  # (M,)
    k = min(params.beam_width, vocab)
    grouped = vocab // GROUP > k  # as _kth_largest decides
    width = k * GROUP + vocab % GROUP if grouped else vocab  # candidates per row
    step = _rows_per_chunk(width, z.device, n_rows * vocab)  # rows per block
    group_max = _group_view(z).amax(-1)[rows] if grouped else None  # (M, V/G) one pass
    parts = [
        _kth_largest(z, beam[s : s + step], k, rows=rows[s : s + step], inv_tau=inv_tau,
                     group_max=None if group_max is None else group_max[s : s + step])
        for s in range(0, max(rows.numel(), 1), step)  # one (empty) block when no row counts
    ]  # fmt: skip
    z_b, z_max, i_max = (torch.cat(t) for t in zip(*parts, strict=True))  # (M,) each
    z_y = z[rows, y[rows]].to(cdtype) * inv_tau  # (M,)
    return _RowTerms(z_b, z_max, i_max, beam, z_y, _margin(z_b, z_y, z_max))


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


def _chunks(rows: torch.Tensor, n_rows: int, vocab: int, n_all: torch.Tensor, masked: bool):
    """The chunks of the counted rows (list of _Chunk).

    With a mask, one host synchronisation reads the widest allowed set: when every counted row
    allows at most V // SPARSE_RATIO tokens, every chunk is sparse, with SPARSE_ROWS times the
    rows of a dense one (its temporaries are (R, V / 8) bytes scanned and (R, K) values)."""
    width = None
    if masked and rows.numel():
        widest = int(n_all[rows].max())
        width = widest if widest * SPARSE_RATIO <= vocab else None
    step = _rows_per_chunk(vocab, rows.device, n_rows * vocab)
    step *= 1 if width is None else SPARSE_ROWS
    every = rows.numel() == n_rows  # every row counted: contiguous slices, no copies
    parts = [slice(s, min(s + step, rows.numel())) for s in range(0, rows.numel(), step)]
    return [_Chunk(part if every else rows[part], part, width) for part in parts]


def _scaled_rows(z, mask, sel, inv_tau, cdtype, vocab, ws, select=False):
    """Chunk of scaled logits z/tau restricted to A (R, V) in cdtype (-inf outside A).

    One pass where possible: with a mask, the bias buffer takes z/tau in place (the dtype
    conversion happens inside the add). That add turns a masked +inf or NaN into NaN, so a chunk
    holding one is redone with `select=True`: masked entries are set to -inf whatever they hold
    (SPEC §2: logits outside A have no effect). Without a mask and in z's dtype the result may
    be a view of z: callers only read it.
    """
    x = z[sel]  # (R, V)
    if mask is not None and select:
        allowed = _mask_bias(mask[sel], vocab, cdtype) == 0  # (R, V)
        return torch.where(allowed, x.to(cdtype) * inv_tau, float("-inf"))  # (R, V)
    if mask is not None:
        return _mask_bias(mask[sel], vocab, cdtype, ws).add_(x, alpha=inv_tau)  # (R, V)
    if x.dtype != cdtype:
        out = ws.take("x", tuple(x.shape), cdtype).copy_(x)  # (R, V)
        return out.mul_(inv_tau) if inv_tau != 1.0 else out
    if inv_tau != 1.0:
        return torch.mul(x, inv_tau, out=ws.take("x", tuple(x.shape), cdtype))
    return x


def _byte_bits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (256, 8), counts (256,)) int64: each byte's set bits, ascending, padded with 8."""
    table = _BYTE_BITS.get(device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8)
        order = torch.where(bits == 1, torch.arange(8), 8).sort(1).values  # set bits first
        table = (order.to(device), bits.sum(1).to(device))
        _BYTE_BITS[device] = table
    return table


def _sparse_rows(z, mask, sel, y_r, inv_tau, cdtype, vocab, width):
    """A sparse chunk's allowed scaled logits: x (R, K) in cdtype, their token ids tok (R, K)
    int64, ascending per row, and valid (R, K) bool; padding entries are -inf at the row's
    target y (whose gradient entry is written last). Masked logits are never read (SPEC §2:
    they have no effect, whatever they hold)."""
    as_bytes = mask[sel].contiguous().view(torch.uint8)  # (R, 4W): byte i holds tokens 8i..8i+7
    n_rows, device = as_bytes.shape[0], as_bytes.device
    r, i = (as_bytes != 0).nonzero(as_tuple=True)  # (M,) each, row-major
    positions, counts = _byte_bits(device)
    byte = as_bytes[r, i].long()  # (M,)
    count = counts[byte]  # (M,) set bits of each byte
    token = i[:, None] * 8 + positions[byte]  # (M, 8)
    j = torch.arange(8, device=device)
    keep = (j < count[:, None]) & (token < vocab)  # (M, 8) bits past V sit at a row's end
    first = count.cumsum(0) - count  # (M,) entries before the byte, all rows
    per_row = torch.zeros(n_rows, dtype=torch.int64, device=device).index_add_(0, r, count)
    in_row = first - (per_row.cumsum(0) - per_row)[r]  # (M,) entries before it in its row
    slot = torch.where(keep, (r * width + in_row)[:, None] + j, n_rows * width)  # last: unused
    tok = torch.full((n_rows * width + 1,), -1, dtype=torch.int64, device=device)
    tok = tok.scatter_(0, slot.reshape(-1), token.reshape(-1))[:-1].view(n_rows, width)
    valid = tok >= 0  # (R, K)
    tok = torch.where(valid, tok, y_r[:, None])
    raw = z[sel].gather(1, tok) if isinstance(sel, slice) else z[sel[:, None], tok]  # (R, K)
    return torch.where(valid, raw.to(cdtype) * inv_tau, float("-inf")), tok, valid


def _put_(grad: torch.Tensor, flat_index: torch.Tensor, values: torch.Tensor) -> None:
    """grad.view(-1)[flat_index] = values in grad's dtype (2-byte floats through an int16 view,
    as `_scatter_`); of repeated positions, one value is kept."""
    values = values.to(grad.dtype)
    if grad.element_size() == 2:
        grad, values = grad.view(torch.int16), values.view(torch.int16)
    grad.view(-1).put_(flat_index.reshape(-1), values.reshape(-1))


def _scatter_(d: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """d.scatter_(1, index, values) in d's dtype; 2-byte floats through an int16 view (a copy of
    the bits): torch 2.13's CPU scatter_ on bf16 / fp16 costs a pass over all of d per call."""
    values = values.to(d.dtype)
    if d.element_size() == 2:
        d.view(torch.int16).scatter_(1, index, values.view(torch.int16))
        return d
    return d.scatter_(1, index, values)


def _chunk_logits(z, y_r, mask, chunk: _Chunk, inv_tau, cdtype, vocab, ws, select=False):
    """(x, tok, valid): the chunk's scaled logits over A, dense (R, V) with tok = valid = None,
    or sparse (R, K) (`_sparse_rows`); y_r (R,) the chunk's targets."""
    if chunk.width is not None:
        return _sparse_rows(z, mask, chunk.sel, y_r, inv_tau, cdtype, vocab, chunk.width)
    return _scaled_rows(z, mask, chunk.sel, inv_tau, cdtype, vocab, ws, select), None, None


def _softmax(x: torch.Tensor, z: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """softmax over the last dim of x, written over x when x is this call's own memory (not a
    view of z) on the CPU, whose kernel reads each entry before writing it (bit-identical to a
    separate output, tested), so a chunk needs one (R, V) buffer; else into the buffer "p"."""
    own = x.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
    if own and x.device.type == "cpu" and x.is_contiguous():
        return torch.softmax(x, dim=-1, out=x)
    return torch.softmax(x, dim=-1, out=ws.take("p", tuple(x.shape), x.dtype))


def _chunk_probs(z, y_r, mask, chunk: _Chunk, inv_tau, cdtype, vocab, ws, select=False):
    """_Probs of the chunk (softmax over A of `_chunk_logits`)."""
    x, tok, valid = _chunk_logits(z, y_r, mask, chunk, inv_tau, cdtype, vocab, ws, select)
    return _Probs(_softmax(x, z, ws), tok, valid)


def _counted(z, y, mask, params: LossParams):
    """(n (N,), counted (N,), rows (M,)): |A|, the counted-row flags, their ids (one host sync)."""
    n_rows, vocab = z.shape
    if mask is not None:
        n_all = allowed_count(mask, vocab)  # (N,)
    else:
        n_all = torch.full((n_rows,), vocab, device=z.device)  # (N,)
    counted = (y != params.ignore_index) & (n_all > 1)  # (N,)
    return n_all, counted, counted.nonzero().squeeze(1)


def _chunk_forward(z, y, mask, chunk: _Chunk, idx, n_all, params: LossParams, cdtype, ws):
    """Steps 1-4 of the reference on one chunk.

    Returns (probs, ce (R,), Δ (R,), b (R,) or None, select, posinf (R,) bool): `select` says
    whether the chunk's masked logits had to be selected away (see `_scaled_rows`); backward
    does the same, and zeroes the chunk's gradient outside A (`_zero_outside`). posinf: the rows
    with an allowed +inf logit (`_posinf_probs_`).
    A sparse chunk works on its allowed tokens (positions in x), mapped back to token ids.
    """
    vocab = z.shape[1]
    inv_tau = 1.0 / params.temperature
    sparse = chunk.width is not None
    # 1. scaled logits of the chunk, restricted to A
    y_r = y[idx]  # (R,)
    x, tok, valid = _chunk_logits(z, y_r, mask, chunk, inv_tau, cdtype, vocab, ws)
    # 2. z_(B') with B' = min(B, n); b only when the gradient needs it (threshold_grad)
    beam = n_all[idx].clamp(max=params.beam_width)  # (R,)
    k = min(params.beam_width, x.shape[1])
    z_b, z_max, i_max = _kth_largest(x, beam, k)  # (R,) each; i_max a position in x
    # topk ranks NaN first, so z_(1) is NaN iff the row of x holds a NaN; with a dense mask that
    # may come from a masked +inf / NaN: redo the chunk by selection (one host sync, masks only;
    # a sparse chunk never reads a masked logit). An allowed NaN or +inf stays: its row
    # soft-maxes to NaN outside A too, so the gradient of a selected chunk is zeroed there
    # (`_zero_outside`).
    hostile = torch.isnan(z_max) | torch.isposinf(z_max)  # (R,)
    select = mask is not None and not sparse and bool(hostile.any())
    if select:
        x, tok, valid = _chunk_logits(z, y_r, mask, chunk, inv_tau, cdtype, vocab, ws, True)
        z_b, z_max, i_max = _kth_largest(x, beam, k)  # (R,) each
    b = None
    if params.threshold_grad:
        if sparse:
            allowed = valid  # (R, K)
        else:
            allowed = None if mask is None else _mask_bias(mask[chunk.sel], vocab, cdtype) == 0
        b = _threshold_index(x, allowed, z_b, beam)  # (R,)
        b = tok.gather(1, b[:, None]).squeeze(1) if sparse else b
    if sparse:
        z_y = torch.where(tok == y_r[:, None], x, float("-inf")).amax(1)  # (R,) -inf: y not in A
    else:
        z_y = x.gather(1, y_r[:, None]).squeeze(1)  # (R,)
    # 3. p = softmax over A (native fused kernel, fast on -inf; over x, which is not read
    #    again); lse = z_(1) - log p_(1), exact to rounding since p_(1) >= 1/n; ce = lse - z_y
    probs = _Probs(_softmax(x, z, ws), tok, valid)
    lse = z_max - torch.log(probs.p.gather(1, i_max[:, None]).squeeze(1))  # (R,)
    # an allowed +inf logit: lse = +inf (softmax gives NaN there), so ce = +inf - z_y, as the
    # reference computes it (an allowed NaN: lse is NaN already)
    lse = torch.where(torch.isposinf(z_max), z_max, lse)
    # 4. Δ = (z_(B') - z_y) / tau; NaN where z_(1) is +inf or NaN, as the reference's
    return probs, lse - z_y, _margin(z_b, z_y, z_max), b, select, torch.isposinf(z_max)


def _target_in_set(mask, rows: torch.Tensor, y_r: torch.Tensor) -> torch.Tensor | None:
    """(R,) bool: whether each row's target y lies in its allowed set A, read from one bitmask
    word per row; None without a mask (A = the vocabulary). A counted target outside A gets
    past the argument checks only with validate_target=False."""
    if mask is None:
        return None
    word = mask[rows, y_r // BITS_PER_WORD]  # (R,)
    return (word >> (y_r % BITS_PER_WORD)) & 1 == 1


def _posinf_probs_(probs: _Probs, z, mask, chunk: _Chunk, posinf: torch.Tensor) -> None:
    """p of the chunk's rows with an allowed +inf logit (posinf (R,) bool) set as the reference
    has it: exp(z_j / tau - lse) with lse = +inf, NaN at each +inf logit and 0 elsewhere (the
    softmax gives NaN throughout). One host sync; such rows are hostile input."""
    at = posinf.nonzero().squeeze(1)  # (r,) positions in the chunk
    if at.numel() == 0:
        return
    rows = chunk.row_ids(z.device)[at]  # (r,) rows of z
    if probs.tok is not None:  # sparse: the chunk's allowed tokens
        hit = torch.isposinf(z[rows[:, None], probs.tok[at]]) & probs.valid[at]  # (r, K)
    else:
        hit = torch.isposinf(z[rows])  # (r, V)
        if mask is not None:
            hit &= _mask_bias(mask[rows], z.shape[1], probs.p.dtype) == 0
    probs.p[at] = torch.where(hit, float("nan"), 0.0).to(probs.p.dtype)


def _zero_outside(grad, mask, chunk: _Chunk, vocab: int, select: bool, a_r) -> None:
    """grad = 0 outside A on a dense masked chunk's rows, where the reference's gradient is 0 (its
    masked_fill stops anything there), if the chunk needs it: after a chunk redone by selection
    (`_chunk_forward`: a row with an allowed NaN or +inf soft-maxes to NaN over all of its
    entries, masked ones too), or when a row's coefficient a of p (a_r (R,)) is not finite
    (a·p is NaN at p = 0: a NaN Δ, as from a -inf target logit with B >= |A|). One host sync."""
    if mask is None or chunk.width is not None:  # A is every token, or only A is written
        return
    if not (select or bool((~torch.isfinite(a_r)).any())):
        return
    outside = _mask_bias(mask[chunk.sel], vocab, grad.dtype) != 0  # (R, V)
    grad[chunk.sel] = grad[chunk.sel].masked_fill(outside, 0.0)


def _write_chunk_grad(grad, chunk: _Chunk, probs: _Probs, coef, y_r, b_r, y_in, threshold_grad):
    """grad[sel] = a·p - c_y·[j=y] + c_b·[j=b] for one chunk; a dense p (R, V) is consumed.

    coef: (a, c_y, c_b), (R,) each; y_in: `_target_in_set` (or None). The dense part is written
    straight into grad when the rows are a slice (a sparse chunk: zeros, then a·p put onto A,
    never an (R, V) temporary); the entries at y and b are then overwritten with their exact
    values, computed in p's dtype, rounded once. A target outside A gets 0, as in the reference,
    which masks z_y before reading it: no -c_y there (nor a NaN, from a row's NaN p).
    """
    sel = chunk.sel
    a_r, cy_r, cb_r = coef
    v_y = a_r * probs.at(y_r) - cy_r  # (R,)
    if threshold_grad:
        same = b_r == y_r  # (R,)
        v_b = a_r * probs.at(b_r) + cb_r  # (R,)
        v_y = torch.where(same, v_y + cb_r, v_y)
        v_b = torch.where(same, v_b - cy_r, v_b)
    if y_in is not None:  # b is in A, so b != y on these rows
        v_y = torch.where(y_in, v_y, 0.0)
    if probs.tok is not None:  # zeros, then a·p, v_y and v_b put at their flat positions
        if isinstance(sel, slice):
            grad[sel].zero_()  # (a buffer with uncounted rows is zeros already)
        base = chunk.row_ids(grad.device)[:, None] * grad.shape[1]  # (R, 1)
        _put_(grad, base + probs.tok, probs.p * a_r[:, None])  # padding: 0 at y, put over next
        _put_(grad, base + y_r[:, None], v_y[:, None])
        if threshold_grad:
            _put_(grad, base + b_r[:, None], v_b[:, None])
        return
    rows = isinstance(sel, slice)
    if rows and probs.p.dtype == grad.dtype:
        d = torch.mul(probs.p, a_r[:, None], out=grad[sel])  # (R, V) in the logits dtype
    elif rows:  # into bf16 / fp16: a mul with that output would make an (R, V) float32 temporary
        d = grad[sel].copy_(probs.p.mul_(a_r[:, None]))
    else:
        d = probs.p.mul_(a_r[:, None])  # (R, V) in cdtype, copied into grad below
    _scatter_(d, y_r[:, None], v_y[:, None])
    if threshold_grad:
        _scatter_(d, b_r[:, None], v_b[:, None])
    if not rows:
        grad[sel] = d.to(grad.dtype)


def _grad_buffer(z, rows):
    """(N, V) row-major gradient in the logits dtype (whatever z's strides: sparse chunks write
    it at flat positions row·V + token); rows that are not counted are 0."""
    make = torch.empty if rows.numel() == z.shape[0] else torch.zeros
    return make(z.shape, dtype=z.dtype, device=z.device)


class _CEMarginTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, mask, params: LossParams):
        n_rows, vocab = z.shape
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        n_all, counted, rows = _counted(z, y, mask, params)
        ce = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        margin = torch.zeros(n_rows, dtype=cdtype, device=z.device)  # (N,)
        b_idx = torch.zeros(n_rows, dtype=torch.int64, device=z.device)  # (N,)
        posinf = torch.zeros(n_rows, dtype=torch.bool, device=z.device)  # (N,)
        chunks = _chunks(rows, n_rows, vocab, n_all, mask is not None)
        ws = _Workspace(z.device)
        selected = []  # per chunk: masked logits selected away (see _scaled_rows)
        for chunk in chunks:
            idx = rows[chunk.part]  # (R,) row ids of this chunk
            _, ce[idx], margin[idx], b, select, posinf[idx] = _chunk_forward(
                z, y, mask, chunk, idx, n_all, params, cdtype, ws
            )
            selected.append(select)
            if b is not None:
                b_idx[idx] = b
        ctx.save_for_backward(z, y, mask, rows, b_idx, counted, posinf)
        ctx.params, ctx.selected, ctx.chunks = params, selected, chunks
        ctx.mark_non_differentiable(counted)
        return ce, margin, counted

    @staticmethod
    def backward(ctx, g_ce, g_margin, _g_counted):
        check_first_order()
        z, y, mask, rows, b_idx, counted, posinf = ctx.saved_tensors
        params = ctx.params
        vocab = z.shape[1]
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        a, c_y, c_b = row_coefficients(g_ce, g_margin, counted, params, cdtype)  # (N,) each
        grad = _grad_buffer(z, rows)  # (N, V)
        ws = _Workspace(z.device)
        inv_tau = 1.0 / params.temperature
        for chunk, select in zip(ctx.chunks, ctx.selected, strict=True):
            idx = rows[chunk.part]  # (R,)
            y_r = y[idx]  # (R,)
            probs = _chunk_probs(z, y_r, mask, chunk, inv_tau, cdtype, vocab, ws, select)
            _posinf_probs_(probs, z, mask, chunk, posinf[idx])
            coef = (a[idx], c_y[idx], c_b[idx])
            y_in = _target_in_set(mask, idx, y_r)
            _write_chunk_grad(
                grad, chunk, probs, coef, y_r, b_idx[idx], y_in, params.threshold_grad
            )
            _zero_outside(grad, mask, chunk, vocab, select, coef[0])
        return grad, None, None, None


def _fused_coefficients(margin, scale: float, params: LossParams, fused: FusedParams):
    """(a, c_y, c_b) of each row's gradient a·p - c_y·[j=y] + c_b·[j=b] for the reduced BEAR
    loss: g_ce = scale and g_Δ = scale·(λ/ξ)·σ(-Δ/ξ) in _common's derivation."""
    inv_tau = 1.0 / params.temperature
    lam, xi = fused.reg_weight, fused.reg_temperature
    g_m = scale * (lam / xi) * torch.sigmoid(-margin / xi)  # (R,)
    c_y = (g_m + scale) * inv_tau  # (R,)
    if params.threshold_grad:
        # + 0·g_m: NaN where Δ is NaN, as the reference's p_j terms of Δ (they cancel)
        return (scale + 0.0 * g_m) * inv_tau, c_y, g_m * inv_tau
    return c_y, c_y, torch.zeros_like(c_y)


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
        grad = _grad_buffer(z, rows)  # (N, V)
        ws = _Workspace(z.device)
        # 5-6. row loss = ce + λ·log σ(Δ/ξ); without a mask, Δ and so every row's gradient
        # coefficients are known before the chunks (_unmasked_terms), which then only soft-max
        vectorised = mask is None and z.stride(1) == 1  # else the chunks find their own terms
        terms = _unmasked_terms(z, y, rows, n_all, params, cdtype) if vectorised else None
        if terms is not None:
            coef_all = _fused_coefficients(terms.margin, scale, params, fused)  # (M,) each
            neg_log_p_max = torch.empty_like(terms.z_y)  # (M,) -log p_(1), chunk by chunk
        total = torch.zeros((), dtype=cdtype, device=z.device)  # ()
        for chunk in _chunks(rows, n_rows, vocab, n_all, mask is not None):
            idx = rows[chunk.part]  # (R,)
            b, select = None, False
            if terms is None:
                # an allowed +inf: Δ is NaN, so is each coefficient, and p does not matter
                probs, ce, margin, b, select, _ = _chunk_forward(
                    z, y, mask, chunk, idx, n_all, params, cdtype, ws
                )
                total += (ce + reg_weight * F.logsigmoid(margin / reg_temperature)).sum()
                coef = _fused_coefficients(margin, scale, params, fused)
            else:
                part = chunk.part
                x = _scaled_rows(z, None, chunk.sel, inv_tau, cdtype, vocab, ws)  # (R, V)
                if params.threshold_grad:
                    b = _threshold_index(x, None, terms.z_b[part], terms.beam[part])
                probs = _Probs(_softmax(x, z, ws))
                i_max = terms.i_max[part]
                neg_log_p_max[part] = -torch.log(probs.p.gather(1, i_max[:, None]).squeeze(1))
                coef = tuple(c[part] for c in coef_all)
            b_r = b if b is not None else torch.zeros_like(idx)  # (R,)
            y_r = y[idx]  # (R,)
            y_in = _target_in_set(mask, idx, y_r)
            _write_chunk_grad(grad, chunk, probs, coef, y_r, b_r, y_in, params.threshold_grad)
            _zero_outside(grad, mask, chunk, vocab, select, coef[0])
        if terms is not None:  # lse = z_(1) - log p_(1); +inf on a row with an allowed +inf
            z_max = terms.z_max
            lse = torch.where(torch.isposinf(z_max), z_max, z_max + neg_log_p_max)
            reg = reg_weight * F.logsigmoid(terms.margin / reg_temperature)
            total = (lse - terms.z_y + reg).sum()
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
