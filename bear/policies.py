"""Where a run starts (``--init RUN``) and the reference policy of preference losses
(``--reference RUN``): both are finished runs of the same model on the same catalogue.

The reference policy of ``sdpo`` / ``sdpo-bear`` (``reference_policy``) is, by default, the policy
training starts from: a LoRA model with its adapters disabled (the base model itself, no second
copy in memory) when the adapters start fresh, else a frozen copy of the starting weights (the
tiny model, or LoRA adapters loaded by ``--init``); with ``--reference RUN``, a frozen copy loaded
with that run's weights. Its log-probabilities are computed without gradients.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from bear.config import TrainConfig
from bear.data import load_titles
from bear.preference import PreferenceBatch, preference_logits
from bear.run import load_run_config, load_weights
from bear.run_folder import read_checkpoint

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ReferencePolicy",
    "check_same_model",
    "load_init",
    "reference_policy",
    "run_weights",
]

# what must match for a run's weights to fit this run's model (tiny sizes, LoRA shape)
ARCHITECTURE_FIELDS = (
    "model",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "lora_r",
    "lora_targets",
)


def run_weights(run: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """The trainable weights a finished run reports (the checkpoint RUN/metrics.json names:
    the selected epoch, or last.pt under --no-eval and the upstream protocol).

    Raises FileNotFoundError naming ``flag`` for a run that has not finished.
    """
    run = Path(run)
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{flag} {run}: no {metrics.name}; give a finished run (train it to the end first)"
        )
    checkpoint = json.loads(metrics.read_text()).get("checkpoint", "last.pt")
    return read_checkpoint(run / checkpoint, fix=f"{flag} needs a finished run")["model"]


def check_same_model(cfg: TrainConfig, run: str | Path, flag: str) -> None:
    """ValueError unless the run ``run`` trained the same model (``ARCHITECTURE_FIELDS``, so
    the same tokenizer and weight shapes) on the same catalogue (item ids and titles) as ``cfg``."""
    other = load_run_config(Path(run))
    differ = [
        f"--{n.replace('_', '-')} is {getattr(other, n)!r} there, {getattr(cfg, n)!r} here"
        for n in ARCHITECTURE_FIELDS
        if getattr(cfg, n) != getattr(other, n)
    ]
    if differ:
        raise ValueError(
            f"{flag} {run}: another model or tokenizer ({'; '.join(differ)}); its weights do not "
            "fit this run's: give a run of the same --model and sizes"
        )
    mine, theirs = load_titles(cfg.data), load_titles(other.data)
    if mine != theirs:
        changed = sorted(set(mine) ^ set(theirs)) or [i for i in mine if mine[i] != theirs[i]]
        raise ValueError(
            f"{flag} {run}: trained on another catalogue ({other.data}: {len(theirs)} items; "
            f"{cfg.data}: {len(mine)}; item {changed[0]} differs); its item tokens are not "
            "this run's: give a run on the same catalogue"
        )


def load_init(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Copy the weights of the finished run ``cfg.init`` into ``model`` (checked first)."""
    check_same_model(cfg, cfg.init, "--init")
    load_weights(model, run_weights(cfg.init, "--init"), source=f"--init {cfg.init}")


class ReferencePolicy:
    """The reference policy π_ref: ``logits(batch, dtype)`` of a ``PreferenceBatch`` without
    gradients, from ``model`` (a frozen copy) or, with ``adapters_disabled``, from the training
    model with its LoRA adapters switched off."""

    def __init__(self, model: torch.nn.Module, adapters_disabled: bool = False):
        self.model, self.adapters_disabled = model, adapters_disabled

    @torch.no_grad()
    def logits(self, batch: PreferenceBatch, dtype: torch.dtype) -> torch.Tensor:
        off = self.model.disable_adapter() if self.adapters_disabled else nullcontext()
        with off:
            return preference_logits(self.model, batch, dtype)

    @property
    def kind(self) -> str:
        return "the model with its LoRA adapters disabled" if self.adapters_disabled else "frozen"


def reference_policy(cfg: TrainConfig, model: torch.nn.Module, device) -> ReferencePolicy:
    """π_ref of ``cfg`` (module docstring) for ``model``, the policy as training starts (after
    ``--init``, before any resumed weights). Raises ValueError where none is available: the tiny
    model from a random start (S-DPO starts from a trained policy: pass --init or --reference)."""
    lora = hasattr(model, "disable_adapter")
    if cfg.reference is None and lora and cfg.init is None:
        return ReferencePolicy(model, adapters_disabled=True)
    if cfg.reference is None and cfg.init is None:
        raise ValueError(
            f"--loss {cfg.loss}: no reference policy: the {cfg.model} model starts from random "
            "weights; S-DPO trains from a trained policy, which is also its reference: pass "
            "--init RUN (an sft run, say) or --reference RUN"
        )
    frozen = copy.deepcopy(model)
    if cfg.reference is not None:
        check_same_model(cfg, cfg.reference, "--reference")
        weights = run_weights(cfg.reference, "--reference")
        load_weights(frozen, weights, source=f"--reference {cfg.reference}")
    frozen.eval().requires_grad_(False)
    return ReferencePolicy(frozen.to(device))
