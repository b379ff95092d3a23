"""The allowed-set bitmask of SPEC §2: 32 tokens per int32 word, packed, unpacked and counted.

Token j is allowed in row i iff `(packed[i, j // 32] >> (j % 32)) & 1` (the xgrammar / vLLM
layout). The lowest layer of the package: it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BITS_PER_WORD", "allowed_count", "pack_allowed_mask", "unpack_allowed_mask"]

# The bitmask word: 32 tokens per int32 (the xgrammar / vLLM layout of SPEC §2).
BITS_PER_WORD = 32


def pack_allowed_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean allowed mask (..., V) into the int32 bitmask (..., ceil(V/32)) of SPEC §2.

    Token j is allowed in row i iff `(packed[i, j // 32] >> (j % 32)) & 1`.

    Args:
        mask: (..., V) bool, True where the token is in the allowed set A.

    Returns:
        (..., ceil(V/32)) int32 on mask's device.

    Raises:
        TypeError if mask is not a tensor; ValueError if it is not bool or has no last dim.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() < 1:
        raise ValueError(f"mask must have shape (..., V), got {tuple(mask.shape)}")
    vocab = mask.shape[-1]
    words = -(-vocab // BITS_PER_WORD)
    padded = F.pad(mask, (0, words * BITS_PER_WORD - vocab))  # (..., W*32)
    bits = padded.reshape(*mask.shape[:-1], words, BITS_PER_WORD).to(torch.int64)  # (..., W, 32)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device)  # (32,)
    weights = weights << torch.arange(BITS_PER_WORD, device=mask.device)
    packed = (bits * weights).sum(-1)  # (..., W) in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement
    return packed.to(torch.int32)


def unpack_allowed_mask(allowed_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of pack_allowed_mask: int32 (..., ceil(V/32)) -> bool (..., V)."""
    j = torch.arange(vocab_size, device=allowed_mask.device)  # (V,)
    words = allowed_mask[..., j // BITS_PER_WORD]  # (..., V)
    return ((words >> (j % BITS_PER_WORD)) & 1).bool()


def allowed_count(allowed_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Number of allowed tokens per row, n = |A|: the popcount of the bitmask on [0, V).

    Args:
        allowed_mask: (..., ceil(V/32)) int32 bitmask (SPEC §2), or None (then n = V; pass the
            shape through `counted_rows` instead).
        vocab_size: V.

    Returns:
        (...) int64.
    """
    if allowed_mask is None:
        raise ValueError("allowed_mask must be a tensor here; with no mask, n = vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    words = -(-vocab_size // BITS_PER_WORD)
    if allowed_mask.shape[-1] != words:
        raise ValueError(
            f"allowed_mask must have last dim ceil(vocab_size/32) = {words}, "
            f"got {allowed_mask.shape[-1]}"
        )
    tail = vocab_size - (words - 1) * BITS_PER_WORD  # valid bits in the last word, 1..32
    x = allowed_mask.to(torch.int32)  # (..., W)
    if tail < BITS_PER_WORD:
        keep = torch.full((words,), -1, dtype=torch.int32, device=x.device)  # (W,) all bits
        keep[-1] = (1 << tail) - 1
        x = x & keep
    # SWAR popcount in int32 (the arithmetic shifts' sign bits are masked off or land above the
    # count's 6 bits): no int64 pass over the mask
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F  # (..., W) four byte counts per word
    x = x + (x >> 8)
    x = (x + (x >> 16)) & 0x3F  # (..., W) the word's count, 0..32
    return x.sum(-1)  # int64
