"""BEAR in TRL's `SFTTrainer` without the deprecated `compute_loss_func` (SPEC §8).

    trainer = BEARSFTTrainer(model=model, args=SFTConfig(...), train_dataset=...,
                             allowed_mask_fn=trie.labels_allowed_mask,
                             bear_options={"beam_width": 10, "reg_weight": 1.0})

TRL computes its own loss through a fused LM head and never calls the model's loss, so a loss
installed on the model (`apply_bear_loss`, `model.loss_function`) does not train there. This
subclass overrides `compute_loss`, TRL's supported extension point: it installs
`apply_bear_loss` on the model and runs one forward that returns BEAR (logits at the supervised
positions only), with transformers' accumulation contract (`num_items_in_batch`, scaled by the
processes under `average_tokens_across_devices`), so the step's gradient equals one big batch's
under accumulation and several processes, as with `Trainer`. Evaluation that asks for logits
(`compute_metrics`) gets the model's full logits from one more gradient-free forward, as TRL
gives them. TRL's token-accuracy and entropy logs need the full logits and are not computed.

This module imports TRL (the `[trl]` extra); importing `bear_kernels` never does.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from .transformers import apply_bear_loss

__all__ = ["BEARSFTTrainer"]


class BEARSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` training BEAR (or msl / SFT through its options).

    Args:
        *args, **kwargs: those of `trl.SFTTrainer` (model, args, datasets, collator, ...), but
            not `compute_loss_func` (this trainer computes the loss).
        allowed_mask_fn: labels (batch, T) -> (batch, T, ceil(V/32)) int32 aligned with labels
            (`ItemTrie.labels_allowed_mask`), or None (the whole vocabulary).
        bear_options: beam_width, reg_weight, reg_temperature, temperature, threshold_grad,
            impl, ignore_index (as `BEARForCausalLMLoss`); reg_weight=0 gives msl with a mask.

    Raises:
        TypeError if `compute_loss_func` is given; ValueError for TRL options that change its
        own loss (loss_type other than "nll", label smoothing, a router loss); the errors of
        `apply_bear_loss` (an unknown option, a model that is no causal LM, one that transforms
        its logits after the head), before any training.
    """

    def __init__(self, *args, allowed_mask_fn=None, bear_options: dict | None = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise TypeError(
                "BEARSFTTrainer: compute_loss_func is given; this trainer computes BEAR itself "
                "(pass allowed_mask_fn= and bear_options=), or use trl.SFTTrainer with it"
            )
        super().__init__(*args, **kwargs)
        unserved = {
            "loss_type": getattr(self.args, "loss_type", "nll") != "nll",
            "label_smoothing_factor": self.label_smoother is not None,
            "a mixture-of-experts router loss": getattr(self, "aux_loss_enabled", False),
        }
        named = [name for name, given in unserved.items() if given]
        if named:
            raise ValueError(
                f"BEARSFTTrainer: {named} change TRL's own loss, which BEAR replaces; leave them "
                "at their defaults (loss_type='nll', no label smoothing, no router loss)"
            )
        # after TRL's own patch of the forward: without labels, TRL's forward runs as before
        apply_bear_loss(self.model, allowed_mask_fn=allowed_mask_fn, **(bear_options or {}))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """BEAR of the batch from one forward with labels (divided by `num_items_in_batch` where
        the trainer counts the step's labels); with `return_outputs`, the model's full-logit
        outputs from a gradient-free forward without labels."""
        inputs = {**inputs, "use_cache": False}
        loss = model(**inputs, num_items_in_batch=num_items_in_batch).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # the count spans every process and DDP averages the gradients: undo the average
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if not return_outputs:
            return loss
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return loss, outputs
