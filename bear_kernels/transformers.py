"""BEAR inside the Hugging Face stack: `Trainer`, TRL's `SFTTrainer`, custom loops (SPEC §8).

    loss = BEARForCausalLMLoss(logits, labels, num_items_in_batch=..., allowed_mask=..., ...)
    apply_bear_loss(model, allowed_mask_fn=trie.labels_allowed_mask, beam_width=10)
    Trainer(..., compute_loss_func=bear_compute_loss_func(trie.labels_allowed_mask, ...))

Accumulation contract (transformers' own): `Trainer` counts the supervised labels of the whole
optimiser step (every micro-batch, and every process with `average_tokens_across_devices`) and
passes that count as `num_items_in_batch`; the loss returns the sum of its row losses divided by
it, and `Trainer` neither averages over accumulation steps nor lets DDP's averaging shrink it. So
the gradient of a step does not depend on how its examples are split into micro-batches and
processes. Without `num_items_in_batch` (a custom loop on one batch) the loss is the mean over the
counted rows of SPEC §2. Forced rows (one allowed token) add 0 to the sum either way; they do count
in `Trainer`'s `num_items_in_batch`, which makes the Trainer loss of msl and bear the loss of
`bear`'s own loop times (counted rows / supervised labels) of the step (sft: identical).

This module is the only one of `bear_kernels` that imports transformers (importing `bear_kernels`
never does).
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import BEARLoss, bear_loss
from ._common import refuse_meta

__all__ = ["BEARForCausalLMLoss", "apply_bear_loss", "bear_compute_loss_func"]

# BEAR's options beside transformers' loss arguments, with bear_loss's defaults (SPEC §2).
BEAR_OPTIONS = (
    "beam_width",
    "reg_weight",
    "reg_temperature",
    "temperature",
    "threshold_grad",
    "impl",
)
# Config fields of heads that transform the logits after the LM head's matmul (Gemma 2 soft-capping,
# Cohere / Granite / Falcon-H1 scaling): the gathered-rows head of apply_bear_loss would skip them.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def _check_options(options: dict) -> None:
    """TypeError for an unknown option; bear_loss's own checks (via BEARLoss) for bad values."""
    unknown = sorted(set(options) - set(BEAR_OPTIONS) - {"ignore_index"})
    if unknown:
        raise TypeError(
            f"unknown BEAR option(s) {unknown}; the options are {list(BEAR_OPTIONS)} and "
            "ignore_index"
        )
    BEARLoss(**options)  # validates B, λ, ξ, tau, threshold_grad, impl, ignore_index


def _check_mask_fn(allowed_mask_fn) -> None:
    if allowed_mask_fn is not None and not callable(allowed_mask_fn):
        raise TypeError(
            "allowed_mask_fn must be None or a callable labels -> (batch, T, ceil(V/32)) int32 "
            f"(e.g. ItemTrie.labels_allowed_mask), got {type(allowed_mask_fn).__name__}"
        )


def _shift(labels: torch.Tensor, allowed_mask, ignore_index: int):
    """Targets and masks of causal-LM rows: position t of the logits predicts labels[:, t + 1].

    (batch, T) labels -> (batch, T) targets, ignore_index in the last column (as transformers'
    ForCausalLMLoss, so the logits need no slicing); the (batch, T, W) mask moves with them.
    """
    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (batch, T)
    if allowed_mask is not None:
        allowed_mask = F.pad(allowed_mask, (0, 0, 0, 1))[..., 1:, :]  # (batch, T, W)
    return target, allowed_mask


def _supervised_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Flat indices (S,) of the rows whose target is supervised (one host sync for S)."""
    return (target.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _reduce(rows_logits, rows_target, rows_mask, num_items_in_batch, ignore_index, options):
    """BEAR on gathered rows: sum / num_items_in_batch, or the mean over counted rows without it.

    rows_logits (S, V), rows_target (S,), rows_mask (S, W) or None.
    """
    common = dict(allowed_mask=rows_mask, ignore_index=ignore_index, **options)
    if num_items_in_batch is None:
        return bear_loss(rows_logits, rows_target, reduction="mean", **common)
    total = bear_loss(rows_logits, rows_target, reduction="sum", **common)
    # a step without any supervised label gives 0 (not 0 / 0), as TRL's own loss
    count = torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
    return total / count.to(total.dtype)


def BEARForCausalLMLoss(  # noqa: N802 (transformers' name pattern for loss functions)
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    beam_width: int = 10,
    reg_weight: float = 1.0,
    reg_temperature: float = 1.0,
    temperature: float = 1.0,
    allowed_mask: torch.Tensor | None = None,
    threshold_grad: bool = False,
    impl: str = "auto",
    **kwargs,
) -> torch.Tensor:
    """BEAR (paper eq. 3.5) with transformers' `ForCausalLMLoss` signature: shifts, accumulation.

        row loss = ce + λ · log σ(Δ / ξ),   Δ = (z_(B') - z_y) / tau   (SPEC §2)
        loss = Σ row losses / num_items_in_batch, or the mean over counted rows without it

    Drop-in for `model.loss_function` and for a custom loop; `reg_weight=0` gives msl with a mask
    and plain cross-entropy (sft) without one. Only the supervised rows reach the kernel.

    Args:
        logits: (batch, T, V) float logits; position t predicts labels[:, t + 1].
        labels: (batch, T) int64, ignore_index where not supervised (unshifted, as Hugging Face).
        vocab_size: V, checked against logits.shape[-1] when given.
        num_items_in_batch: the supervised labels of the whole optimiser step (Trainer's count,
            int or scalar tensor); None: the mean over this batch's counted rows.
        ignore_index: label value of unsupervised positions.
        shift_labels: (batch, T) targets already aligned with the logits (context parallelism);
            then `labels` is not used and `allowed_mask` is aligned with shift_labels.
        beam_width, reg_weight, reg_temperature, temperature, threshold_grad, impl: B, λ, ξ, tau
            and the options of `bear_loss`.
        allowed_mask: (batch, T, ceil(V/32)) int32 bitmask aligned with `labels` (position t
            holds the allowed set of labels[:, t], e.g. `ItemTrie.labels_allowed_mask(labels)`);
            None: the whole vocabulary.
        **kwargs: the model's forward kwargs transformers passes to every loss; not used.

    Returns:
        A scalar float32 tensor (float64 for float64 logits).

    Raises:
        ValueError: vocab_size differing from the logits, mismatched shapes, num_items_in_batch
            below 1 with supervised labels, and every check of `bear_loss` (a target outside its
            allowed set, bad hyperparameters).
    """
    if vocab_size is not None and vocab_size != logits.shape[-1]:
        raise ValueError(
            f"vocab_size={vocab_size} differs from the logits' last dim {logits.shape[-1]}"
        )
    if shift_labels is None:
        target, mask = _shift(labels, allowed_mask, ignore_index)
    else:
        target, mask = shift_labels, allowed_mask
    refuse_meta(logits)
    target = target.to(logits.device)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(target.shape)}"
        )
    rows = _supervised_rows(target, ignore_index)  # (S,)
    if num_items_in_batch is not None and rows.numel() and int(num_items_in_batch) < 1:
        raise ValueError(
            f"num_items_in_batch: got {int(num_items_in_batch)} with {rows.numel()} supervised "
            "labels in this batch; it counts the supervised labels of the whole step (at least "
            "this batch's): pass that count, or None for this batch's mean"
        )
    rows_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)  # (S, V)
    rows_mask = None
    if mask is not None:
        rows_mask = mask.to(logits.device).reshape(-1, mask.shape[-1]).index_select(0, rows)
    options = dict(
        beam_width=beam_width,
        reg_weight=reg_weight,
        reg_temperature=reg_temperature,
        temperature=temperature,
        threshold_grad=threshold_grad,
        impl=impl,
    )
    rows_target = target.reshape(-1).index_select(0, rows)  # (S,)
    return _reduce(rows_logits, rows_target, rows_mask, num_items_in_batch, ignore_index, options)


def bear_compute_loss_func(allowed_mask_fn=None, **options):
    """A `compute_loss_func` for `transformers.Trainer` and TRL's `SFTTrainer` that trains BEAR.

        loss_func = bear_compute_loss_func(trie.labels_allowed_mask, beam_width=10)
        Trainer(..., compute_loss_func=loss_func)

    The trainer runs the model without labels (full logits) and calls
    `loss_func(outputs, labels, num_items_in_batch=...)`, which returns
    `BEARForCausalLMLoss(outputs.logits, labels, num_items_in_batch=..., allowed_mask=...)`.
    TRL's `SFTTrainer` computes its own loss from a fused head and never calls
    `model.loss_function`: there `compute_loss_func` is the way in (TRL then runs one more,
    gradient-free forward for its logged metrics).

    Args:
        allowed_mask_fn: labels (batch, T) -> (batch, T, ceil(V/32)) int32 aligned with labels
            (`ItemTrie.labels_allowed_mask`), or None (the whole vocabulary).
        **options: beam_width, reg_weight, reg_temperature, temperature, threshold_grad, impl,
            ignore_index (as `BEARForCausalLMLoss`); reg_weight=0 gives msl (with a mask) or sft.

    Returns:
        A callable (outputs, labels, num_items_in_batch=None) -> scalar loss.

    Raises:
        TypeError for an unknown option or a non-callable allowed_mask_fn; ValueError for a bad
        option value (checked here, before any training).
    """
    _check_mask_fn(allowed_mask_fn)
    _check_options(options)

    def compute_loss(outputs, labels, num_items_in_batch=None):
        mask = None if allowed_mask_fn is None else allowed_mask_fn(labels)
        return BEARForCausalLMLoss(
            outputs.logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            allowed_mask=mask,
            **options,
        )

    return compute_loss


def _causal_lm(model):
    """The transformers causal LM inside `model` (a peft model's base model, or model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # `base_model` (the module under `base_model_prefix`) is the decoder in every release;
    # `get_decoder()` returns None for Llama in transformers 4.56.0
    decoder = getattr(inner, "base_model", None)
    if head is None or decoder is None or decoder is inner:
        raise TypeError(
            "model must be a transformers causal LM (an LM head over a decoder, e.g. "
            f"LlamaForCausalLM) or a peft model of one, got {type(inner).__name__}"
        )
    text_config = inner.config.get_text_config()
    transforms = [n for n in LOGIT_TRANSFORMS if getattr(text_config, n, None) not in (None, 1.0)]
    if transforms:
        raise ValueError(
            f"apply_bear_loss: this model transforms its logits after the LM head "
            f"({transforms}), which the gathered-rows head would skip; use "
            "Trainer(compute_loss_func=bear_compute_loss_func(...)) instead"
        )
    return inner


BYPASSED = (
    "apply_bear_loss: the model's decoder ran outside its forward (TRL's SFTTrainer computes its "
    "own loss through a fused LM head): this step does not train BEAR; use "
    "bear_kernels.trl.BEARSFTTrainer, or compute_loss_func=bear_compute_loss_func(...)"
)


@contextlib.contextmanager
def _inside_forward(lm):
    """Mark the decoder's calls made by the patched forward (nested calls counted)."""
    lm._bear_depth = getattr(lm, "_bear_depth", 0) + 1
    try:
        yield
    finally:
        lm._bear_depth -= 1


class _DecoderGuard:
    """A forward pre-hook on the decoder that warns (once per model) when the decoder runs
    outside the patched forward: a trainer that runs the decoder and its own head itself (TRL's
    fused LM head) trains its own loss. An object, not a closure, so that copy.deepcopy and
    pickle carry it with the model and a copy guards itself."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, module, args):
        lm = self.lm
        if getattr(lm, "_bear_depth", 0) == 0 and not getattr(lm, "_bear_warned", False):
            lm._bear_warned = True
            warnings.warn(BYPASSED, RuntimeWarning, stacklevel=2)


def _guard_the_decoder(lm) -> None:
    """Register one ``_DecoderGuard`` on the decoder (applied again: the old one goes)."""
    hooks = lm.base_model._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if isinstance(hook, _DecoderGuard)]:
        del hooks[key]
    lm.base_model.register_forward_pre_hook(_DecoderGuard(lm))


class _BEARForward:
    """The forward ``apply_bear_loss`` installs on a causal LM: with labels, BEAR on the
    supervised positions' logits; without, the model's own forward (``original``, or the class's
    where that is None). An object holding its model, not a closure, so that copy.deepcopy and
    pickle of the model carry it: a copy computes with its own weights."""

    def __init__(self, lm, original, allowed_mask_fn, ignore_index: int, options: dict):
        self.lm, self.original = lm, original
        self.allowed_mask_fn, self.ignore_index, self.options = (
            allowed_mask_fn,
            ignore_index,
            options,
        )

    def _original(self):
        if self.original is not None:
            return self.original
        return types.MethodType(type(self.lm).forward, self.lm)

    @property
    def __signature__(self) -> inspect.Signature:  # what Trainer and generate inspect
        return inspect.signature(self._original())

    def __call__(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        lm = self.lm
        if kwargs.get("fused_lm_head"):
            raise RuntimeError(BYPASSED)
        if labels is None:
            with _inside_forward(lm):
                return self._original()(*args, **kwargs)
        if kwargs.get("shift_labels") is not None:
            raise ValueError(
                "apply_bear_loss: shift_labels (context parallelism) is not supported; call "
                "BEARForCausalLMLoss on the logits instead"
            )
        kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)  # only the supervised positions become logits
        kwargs.setdefault("use_cache", False)  # a loss, not generation: no KV cache
        with _inside_forward(lm):
            outputs = lm.base_model(*args, **kwargs)  # looked up per call: FSDP may replace it
        hidden = outputs[0]  # (batch, T, H) after the final norm
        refuse_meta(hidden)
        labels = labels.to(hidden.device)
        ignore_index = self.ignore_index
        mask = None if self.allowed_mask_fn is None else self.allowed_mask_fn(labels)
        target, mask = _shift(labels, mask, ignore_index)
        rows = _supervised_rows(target, ignore_index)  # (S,)
        head = lm.get_output_embeddings()
        rows_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (S, H)
        rows_logits = head(rows_hidden.to(head.weight.device))  # (S, V)
        rows_target = target.reshape(-1).index_select(0, rows).to(rows_logits.device)  # (S,)
        rows_mask = None
        if mask is not None:
            rows_mask = mask.reshape(-1, mask.shape[-1]).index_select(0, rows)
            rows_mask = rows_mask.to(rows_logits.device)  # (S, W)
        loss = _reduce(
            rows_logits, rows_target, rows_mask, num_items_in_batch, ignore_index, self.options
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def apply_bear_loss(model, allowed_mask_fn=None, **options) -> None:
    """Make `model(..., labels=labels)` return BEAR, computing logits at supervised positions only.

        apply_bear_loss(model, allowed_mask_fn=trie.labels_allowed_mask, beam_width=10)
        loss = model(input_ids, attention_mask=mask, labels=labels).loss

    Liger style: the causal LM's `forward` is replaced on this instance. With labels, it runs the
    decoder, gathers the hidden states of the supervised positions (S rows, after the shift) and
    applies the LM head to those only, so the prompt's positions never become (T, V) logits; the
    loss is `BEARForCausalLMLoss`'s on those rows (with `num_items_in_batch`, which `Trainer`
    passes, the sum divided by it). The output's `logits` are then None. Without labels the
    original forward runs (generation and evaluation are unchanged). Applying it again replaces
    the options. Works on a peft model (the adapters stay in the decoder's layers).

    TRL's `SFTTrainer` does not use it: TRL runs the decoder and its own fused head and loss.
    Use `bear_kernels.trl.BEARSFTTrainer` there; a decoder run outside this forward warns
    (RuntimeWarning, once), and a call with TRL's `fused_lm_head=True` raises RuntimeError.

    Args:
        model: a transformers causal LM (e.g. LlamaForCausalLM) or a peft model of one.
        allowed_mask_fn: labels (batch, T) -> (batch, T, ceil(V/32)) int32 aligned with labels
            (`ItemTrie.labels_allowed_mask`), or None (the whole vocabulary).
        **options: beam_width, reg_weight, reg_temperature, temperature, threshold_grad, impl,
            ignore_index (as `BEARForCausalLMLoss`).

    Raises:
        TypeError for a model without an LM head over a decoder, an unknown option or a
        non-callable allowed_mask_fn; ValueError for a bad option value or a model that
        transforms its logits after the head (soft-capping, logit scaling).
    """
    _check_mask_fn(allowed_mask_fn)
    _check_options(options)
    lm = _causal_lm(model)
    ignore_index = options.pop("ignore_index", -100)
    current = lm.__dict__.get("forward")  # an instance forward: ours, or another library's patch
    original = current.original if isinstance(current, _BEARForward) else current
    _guard_the_decoder(lm)
    lm.forward = _BEARForward(lm, original, allowed_mask_fn, ignore_index, options)
