"""The loss seam (SPEC §11): losses are registered objects; a new one is one class, and the
command line, the training step and evaluation take it from the registry."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_train import tiny_synth
from test_readme import README, python_blocks

import bear.losses.registry as registry
from bear.cli import build_parser
from bear.config import TrainConfig
from bear.evaluate import EvalSettings
from bear.losses import Loss, LossSettings, build_loss, get_loss, loss_names
from bear_kernels import ce_margin_reference, pack_allowed_mask

SECTION = "## A new loss, a new decoder"


@pytest.fixture
def registered(monkeypatch):
    """The registry as it is; whatever a test registers is gone after it."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))


def test_every_builtin_loss_is_its_registered_class_with_the_scoring_of_its_softmax():
    for name in loss_names():
        cls = get_loss(name)
        assert issubclass(cls, Loss) and cls.name == name
        # a full-vocabulary softmax is decoded with "after" scoring, the children's with "before"
        assert cls.scoring == ("after" if cls.full_vocabulary else "before")
    assert [n for n in loss_names() if get_loss(n).full_vocabulary] == ["sft", "sdpo", "sdpo-bear"]


def test_evaluation_takes_its_scoring_from_the_loss(tmp_path):
    data = tiny_synth(tmp_path / "data")
    for loss in loss_names():
        cfg = TrainConfig(data=str(data), out=str(tmp_path / loss), loss=loss)
        assert EvalSettings.from_config(cfg).scoring == get_loss(loss).scoring


def test_unknown_and_duplicate_names_are_refused(registered):
    with pytest.raises(ValueError, match=r"loss: got 'nope', expected one of \('sft'"):
        get_loss("nope")

    class Again(Loss):
        name = "msl"

    with pytest.raises(ValueError, match="'msl' is taken by bear.losses.msl.MSL"):
        registry.register_loss(Again)

    class Nameless(Loss):
        pass

    with pytest.raises(ValueError, match="needs a class attribute name"):
        registry.register_loss(Nameless)


def _readme_namespace(tmp_path) -> dict:
    """The section's first block run as written (it registers focal-msl)."""
    blocks = python_blocks(README.read_text(), SECTION)
    namespace: dict = {"__name__": "readme_loss"}
    exec(compile(blocks[0], f"README.md ({SECTION})", "exec"), namespace)
    return namespace


def test_the_readme_loss_computes_its_formula(registered, tmp_path):
    """FocalMSL's micro-batch sum is Σ (1 - p_y)^2 · ce over the trie children, on counted rows,
    against the float64 reference's ce; its denominator is the counted rows."""
    _readme_namespace(tmp_path)
    assert "focal-msl" in loss_names()
    g = torch.Generator().manual_seed(0)
    U, W, V = 3, 4, 37
    logits = torch.randn(U, W, V, generator=g, dtype=torch.float64)
    allowed = torch.rand(U, W, V, generator=g) < 0.4
    target = torch.randint(0, V, (U, W), generator=g)
    allowed.scatter_(2, target[..., None], True)
    target[1, 0] = -100
    mask = pack_allowed_mask(allowed.reshape(U * W, V)).reshape(U, W, -1)
    total, denominator = build_loss(LossSettings("focal-msl"))(logits, target, mask)
    ce, _ = ce_margin_reference(logits, target, beam_width=10, allowed_mask=mask)
    want = ((1 - torch.exp(-ce)) ** 2 * ce).sum()
    torch.testing.assert_close(total, want)
    assert int(denominator) == int((target != -100).sum())  # every row has > 1 allowed here


def test_a_registered_loss_trains_from_the_readme_and_is_a_cli_choice(registered, tmp_path):
    """The section's second block trains the new loss as written; the train parser offers it."""
    namespace = _readme_namespace(tmp_path)
    choices = build_parser()._subparsers._group_actions[0].choices["train"]
    loss_flag = next(a for a in choices._actions if a.dest == "loss")
    assert "focal-msl" in loss_flag.choices
    namespace.update(data=str(tiny_synth(tmp_path / "data")), out=str(tmp_path / "focal"))
    second = python_blocks(README.read_text(), SECTION)[1]
    exec(compile(second, f"README.md ({SECTION})", "exec"), namespace)
    assert namespace["metrics"]["test"]["users"] > 0
    config = json.loads((tmp_path / "focal" / "config.json").read_text())
    assert config["loss"] == "focal-msl"


def test_per_loss_settings_are_checked_by_the_loss():
    with pytest.raises(ValueError, match="has no τ"):
        LossSettings("beam-sim", temperature=0.5)
    with pytest.raises(ValueError, match="topk_weight: given for loss 'msl'"):
        LossSettings("msl", topk_weight=1.0)
    assert LossSettings("bear-upstream", topk_weight=1.0).topk_weight == 1.0
    with pytest.raises(ValueError, match="settings: for loss 'bear', given to 'msl'"):
        get_loss("msl")(LossSettings("bear"))


def test_registry_and_cli_help_need_no_torch():
    """The names of the losses come without importing a loss module (and so without torch)."""
    import subprocess
    import sys

    code = (
        "import sys; from bear.losses.registry import loss_names; "
        "from bear.decoding.registry import decoder_names; "
        "print(loss_names(), decoder_names(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("('beam', 'exact', 'diverse', 'sample') False")
