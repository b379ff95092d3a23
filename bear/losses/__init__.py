"""Training losses on the loss seam (SPEC §2, §6, §11): one module per loss, registered by name.

| name          | row term (counted rows)                                       | softmax over |
| ------------- | ------------------------------------------------------------- | ------------ |
| sft           | ce (upstream's LML)                                           | all tokens   |
| msl           | ce (constrained softmax)                                      | trie         |
| bear          | ce + λ·log σ(Δ/ξ)  (paper eq. 3.5)                            | trie         |
| bear-upstream | w·ce, w = 1 + λ_u·σ(−Δ/ξ) detached, λ_u = topk_weight (λ/ξ)   | trie         |
| beam-sim      | ce + λ·log σ((θ_t − log P(y≤t|x))/ξ), θ_t from a beam search  | trie         |

``bear.losses.base.Loss`` says how a loss is written and how its sums and denominators make
accumulation exact; ``bear.losses.registry`` holds the names. A new loss is one file::

    from bear.losses import Loss, RowTerms, register_loss

    @register_loss
    class FocalMSL(Loss):
        name = "focal-msl"  # --loss focal-msl; softmax over the trie children, "before" scoring

        def terms(self, ce, margin, counted, target, prepared):
            p = (-ce).exp()  # p_y on every row (ce = 0, p = 1 where a row is not counted)
            return RowTerms((1 - p) ** 2 * ce)

(``tests/test_loss_seam.py`` runs it.) Names are imported from their modules on first use
(PEP 562), and each built-in loss's module when its name is first asked for, so the registry
loads no torch.
"""

from bear._lazy import lazy_exports

_EXPORTS = {
    "BUILTIN_LOSSES": "bear.losses.registry",
    "NORMALISATIONS": "bear.losses.registry",
    "Loss": "bear.losses.base",
    "LossSettings": "bear.losses.registry",
    "RowTerms": "bear.losses.base",
    "build_loss": "bear.losses.base",
    "get_loss": "bear.losses.registry",
    "loss_names": "bear.losses.registry",
    "register_loss": "bear.losses.registry",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
