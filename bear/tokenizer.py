"""A byte-level BPE tokenizer trained on a dataset's text for the tiny model (tokenizers)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["train_tokenizer", "PAD_TOKEN", "EOS_TOKEN"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (ids 0, 1 are pad and EOS) on ``texts``.

    Byte-level pre-tokenisation splits at newlines, so a prompt ending in "\\n" never shares a
    token with the response that follows it. No BOS token is added.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size: got {vocab_size}, expected >= 300 (256 bytes + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
