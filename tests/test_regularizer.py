"""bear_regularizer, the BEAR term on its own (issue: BEAR on any objective): its formula against
the reference, its sign's effect, and the README's "add BEAR to your own DPO loss", run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_readme import README, python_blocks

from bear_kernels import bear_regularizer, ce_margin_reference
from tests._helpers_kernels import make_case

SECTION = "### Add BEAR to your own DPO loss"


@pytest.mark.parametrize("kind", ["none", "mixed"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_it_is_log_sigmoid_of_the_margin_on_counted_rows(kind, reduction):
    z, y, mask = make_case(5, 31, kind, seed=2, ignore_rows=(1,), dtype=torch.float64)
    got = bear_regularizer(z, y, beam_width=3, reg_temperature=0.7, allowed_mask=mask,
                           reduction=reduction)  # fmt: skip
    ce, margin = ce_margin_reference(z, y, beam_width=3, allowed_mask=mask)
    counted = (y != -100) & (ce != 0)
    rows = torch.where(counted, F.logsigmoid(margin / 0.7), 0.0)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted.sum()}[reduction]
    torch.testing.assert_close(got, want)


def test_its_sign_moves_the_target_into_or_out_of_the_top_b():
    """A step of gradient descent on +reg raises the target's logit against the others (into the
    top-B), on -reg lowers it (out of it)."""
    z = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([2])
    for sign in (1.0, -1.0):
        x = z.clone().requires_grad_()
        (sign * bear_regularizer(x, y, beam_width=2)).sum().backward()
        rises = float(-x.grad[0, 2]) > 0  # descent moves z_y by -grad
        assert rises == (sign > 0)


def test_bad_arguments_are_named():
    z, y = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="reg_temperature"):
        bear_regularizer(z, y, reg_temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        bear_regularizer(z, y, reduction="max")


def test_the_readme_dpo_example_runs_and_adds_bear_to_dpo():
    """Both blocks run as written; at λ = 0 the function is plain DPO; the BEAR part has a
    gradient on the rejected logits of its own (pushing the rejected tokens out of the beam)."""
    blocks = python_blocks(README.read_text(), SECTION)
    assert len(blocks) == 2
    namespace: dict = {"__name__": "readme_dpo"}
    for block in blocks:
        exec(compile(block, f"README.md ({SECTION})", "exec"), namespace)
    loss = namespace["loss"]
    assert torch.isfinite(loss) and namespace["chosen_logits"].grad is not None
    fn, trie = namespace["dpo_bear_loss"], namespace["trie"]
    args = [namespace[k] for k in ("chosen_logits", "chosen_labels", "rejected_logits",
                                   "rejected_labels")]  # fmt: skip
    chosen = (args[0], args[1], trie.labels_allowed_mask(args[1]))
    rejected = (args[2], args[3], trie.labels_allowed_mask(args[3]))
    refs = dict(ref_chosen=torch.tensor([-4.0, -2.5]), ref_rejected=torch.tensor([-4.2, -3.0]))
    plain = fn(chosen, rejected, lam=0.0, **refs)
    logp = [namespace["sequence_logp"](*c[:2]) for c in (chosen, rejected)]
    margin = 0.1 * ((logp[0] - refs["ref_chosen"]) - (logp[1] - refs["ref_rejected"]))
    torch.testing.assert_close(plain, -F.logsigmoid(margin).mean())
    bear_only = fn(chosen, rejected, lam=1.0, **refs) - plain
    (grad,) = torch.autograd.grad(bear_only, args[2])
    assert grad.abs().sum() > 0
