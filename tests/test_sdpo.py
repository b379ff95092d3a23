"""S-DPO and S-DPO + BEAR (issue: BEAR on any objective): the formula by hand and against a float64
reference, gradcheck, sdpo-bear at λ = 0 is sdpo, the one-forward layout equals separate
sequences, accumulation and resume equal one run, negatives and the reference policy."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers_train import TINY_SYNTH, last_weights, tiny_checkpoint, tiny_config, tiny_synth

from bear.losses import LossSettings, build_loss
from bear.losses.sdpo import PreferenceInputs
from bear.negatives import NegativeSampler
from bear.policies import load_init
from bear.preference import PreferenceBatch, collate_preference, preference_logits
from bear.run import build_setup
from bear.synth import write_synth
from bear.train import train
from bear.train_step import StepContext, accumulate_gradients, micro_batches
from bear_kernels import pack_allowed_mask

IGNORE = -100


def _inputs(z, target, reference_logp, allowed=None):
    """(the logits of the supervised steps (N, V), PreferenceInputs) of (U, R, W, V) logits and
    (U, R, W) targets (IGNORE after a response's end): the loss reads the flat steps."""
    U, R, W = target.shape
    valid = target != IGNORE  # (U, R, W)
    u, r, _ = valid.nonzero(as_tuple=True)
    empty = torch.zeros(U, 1, dtype=torch.long)
    batch = PreferenceBatch(
        input_ids=empty, mask=empty, segment=empty, position_ids=empty,
        items=torch.zeros(U, R, dtype=torch.long), step_row=u, step_pos=torch.zeros_like(u),
        step_response=u * R + r, step_target=target[valid], step_node=torch.zeros_like(u),
    )  # fmt: skip
    mask = None if allowed is None else pack_allowed_mask(allowed[valid])
    return z[valid], PreferenceInputs(batch, reference_logp, mask)


def _hand_case():
    """One prompt, a positive and two negatives, V = 4 (values worked out in the test)."""
    z = torch.zeros(1, 3, 2, 4, dtype=torch.float64)
    z[0, 0, 0, 0], z[0, 0, 1, 1] = 2.0, 1.0  # positive: tokens 0 then 1
    z[0, 1, 0, 1] = 2.0  # negative 1: token 2 then 1
    z[0, 2, 0] = 1.0  # negative 2: token 3, then nothing (a shorter response)
    target = torch.tensor([[[0, 1], [2, 1], [3, IGNORE]]])
    allowed = torch.zeros(1, 3, 2, 4, dtype=torch.bool)
    allowed[0, 0, 0, [0, 1]] = True  # Δ = 2 - 2 = 0
    allowed[0, 0, 1, 1] = True  # forced: not counted
    allowed[0, 1, 0, [1, 2]] = True  # Δ = 2 - 0 = 2
    allowed[0, 1, 1] = True  # all four: Δ = 0
    allowed[0, 2, 0, [0, 3]] = True  # a tie at the top: Δ = 0
    allowed[0, 2, 1, 0] = True  # ignored row
    return z, target, torch.tensor([[-1.0, -2.0, -1.5]], dtype=torch.float64), allowed


def test_sdpo_and_sdpo_bear_match_a_hand_computed_case():
    z, target, ref, allowed = _hand_case()
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    logp_pos = (2 - lse(2, 0, 0, 0)) + (1 - lse(0, 1, 0, 0))
    logp_n1 = (0 - lse(0, 2, 0, 0)) + (0 - lse(0, 0, 0, 0))
    logp_n2 = 1 - lse(1, 1, 1, 1)
    r = [logp_pos + 1.0, logp_n1 + 2.0, logp_n2 + 1.5]
    beta = 0.5
    sdpo = math.log(1 + math.exp(beta * (r[1] - r[0])) + math.exp(beta * (r[2] - r[0])))
    settings = LossSettings("sdpo", dpo_beta=beta)
    total, examples = build_loss(settings)(*_inputs(z, target, ref))
    assert float(examples) == 1.0
    assert float(total) == pytest.approx(sdpo, abs=1e-12)
    # + λ·reg over the positive's counted tokens, − λ·reg over the negatives' (B = 1, ξ = 1)
    log_half, reg_two = math.log(0.5), -math.log(1 + math.exp(-2.0))
    lam = 0.5
    want = sdpo + lam * (log_half - (reg_two + log_half + log_half))
    bear = LossSettings("sdpo-bear", beam_width=1, reg_weight=lam, dpo_beta=beta)
    total, _ = build_loss(bear)(*_inputs(z, target, ref, allowed))
    assert float(total) == pytest.approx(want, abs=1e-12)


def reference_loss(z, target, ref, allowed, beta, lam, xi, B):
    """Both losses in plain float64 PyTorch (β of the margin a constant, as in BEAR)."""
    valid = target != IGNORE
    y = target.clamp(min=0)[..., None]
    logp = torch.where(valid, z.log_softmax(-1).gather(-1, y)[..., 0], 0.0).sum(-1)  # (U, R)
    r = logp - ref
    loss = F.softplus(torch.logsumexp(beta * (r[:, 1:] - r[:, :1]), dim=1))  # (U,)
    if lam == 0:
        return loss.sum()
    logp_a = z.masked_fill(~allowed, float("-inf")).log_softmax(-1)  # over A
    n = allowed.sum(-1)
    counted = valid & (n > 1)
    order = (
        z.masked_fill(~allowed, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    )
    b = order.gather(-1, (torch.minimum(n, torch.tensor(B)) - 1).clamp(min=0)[..., None])
    margin = logp_a.gather(-1, b)[..., 0].detach() - logp_a.gather(-1, y)[..., 0]
    reg = torch.where(counted, F.logsigmoid(margin / xi), 0.0).sum(-1)  # (U, R)
    return (loss + lam * (reg[:, 0] - reg[:, 1:].sum(1))).sum()


def _random_case(seed, U=3, R=4, W=5, V=23):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(U, R, W, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (U, R, W), generator=g)
    target[0, 1, 2:] = IGNORE  # shorter responses
    target[-1, 0, 1:] = IGNORE
    allowed = torch.rand(U, R, W, V, generator=g) < 0.3
    allowed.scatter_(-1, target.clamp(min=0)[..., None], True)
    allowed[1, 2, 1] = False
    allowed[1, 2, 1, target[1, 2, 1]] = True  # a forced token
    ref = torch.randn(U, R, generator=g, dtype=torch.float64) - 5
    return z, target, ref, allowed


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("loss", "lam"), [("sdpo", 0.0), ("sdpo-bear", 0.7), ("sdpo-bear", 0.0)])
def test_both_losses_and_their_gradients_match_the_float64_reference(seed, loss, lam):
    z, target, ref, allowed = _random_case(seed)
    settings = LossSettings(loss, beam_width=3, reg_weight=lam, reg_temperature=0.6, dpo_beta=0.8)
    x, x_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    total, _ = build_loss(settings)(*_inputs(x, target, ref, allowed))
    want = reference_loss(x_ref, target, ref, allowed, 0.8, lam, 0.6, 3)
    torch.testing.assert_close(total, want, atol=1e-10, rtol=1e-10)
    total.backward()
    want.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)


def test_sdpo_passes_gradcheck():
    z, target, ref, _ = _random_case(3, U=2, R=3, W=3, V=7)
    loss = build_loss(LossSettings("sdpo", dpo_beta=1.3))
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(*_inputs(t, target, ref))[0], (z,))


def test_sdpo_bear_at_zero_weight_is_sdpo_exactly():
    z, target, ref, allowed = _random_case(4)
    grads, totals = [], []
    for settings in (LossSettings("sdpo"), LossSettings("sdpo-bear", reg_weight=0.0)):
        x = z.clone().requires_grad_()
        total, _ = build_loss(settings)(*_inputs(x, target, ref, allowed))
        total.backward()
        totals.append(total)
        grads.append(x.grad)
    assert torch.equal(totals[0], totals[1]) and torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------ on a tiny trained model
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """(dataset, a finished sft run: the starting point of S-DPO)."""
    root = tmp_path_factory.mktemp("sdpo")
    data = tiny_synth(root / "synth")
    run = root / "sft"
    train(tiny_config(data, run, loss="sft", epochs=2, limit_train=40, lr=3e-3))
    return data, run


def _setup(sft_run, tmp_path, **overrides):
    data, sft = sft_run
    options = dict(loss="sdpo-bear", init=str(sft), negatives=2, beam_width=4) | overrides
    cfg = tiny_config(data, tmp_path / "r", **options)
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    if cfg.init is not None:
        load_init(cfg, setup.model)
    loss = build_loss(cfg.loss_settings())
    loss.start(cfg, setup, torch.device("cpu"))
    return cfg, setup, loss


def test_one_forward_equals_each_response_after_its_prompt_alone(sft_run, tmp_path):
    """preference_logits: the prompt run once with its responses side by side under the 4-D mask
    gives, for every response step, the logits of that response following the prompt alone."""
    cfg, setup, _ = _setup(sft_run, tmp_path)
    model = setup.model.eval()
    prompts = [setup.prompts["train"][i] for i in (0, 3, 5)]
    items = sorted(setup.items)
    responses = [[items[0], items[7], items[2]], [items[5], items[1], items[9]],
                 [items[4], items[4], items[8]]]  # fmt: skip
    batch = collate_preference(prompts, responses, setup.items, setup.trie, setup.pad_id)
    with torch.no_grad():
        got = preference_logits(model, batch, torch.float32)  # (N, V)
        for u, prompt in enumerate(prompts):
            for r, item in enumerate(responses[u]):
                tokens = setup.items[item] + [setup.trie.eos_token_id]
                ids = torch.tensor([prompt + tokens[:-1]])
                alone = model(input_ids=ids).logits[0, len(prompt) - 1 :]  # (len(tokens), V)
                steps = batch.step_response == u * len(responses[u]) + r
                torch.testing.assert_close(got[steps], alone, atol=2e-5, rtol=1e-4)
                assert batch.step_target[steps].tolist() == tokens
    assert batch.input_ids.shape[1] < max(len(p) for p in prompts) + 3 * max(
        len(setup.items[i]) for row in responses for i in row
    )  # packed: no response padded to the longest


@pytest.mark.parametrize("loss", ["sdpo", "sdpo-bear"])
@pytest.mark.parametrize(("batch", "micro"), [(8, 8), (8, 4), (9, 3)])
def test_accumulation_gives_the_gradient_of_one_batch(sft_run, tmp_path, loss, batch, micro):
    """The step's gradient at accumulation 1 (one micro-batch), 2×4 and 3×3 equals one batch."""
    cfg, setup, objective = _setup(sft_run, tmp_path, loss=loss, reg_weight=0.5)
    model, cpu = setup.model.float().train(), torch.device("cpu")
    ctx = StepContext(model, setup.trie, cpu)
    idx = list(range(3, 3 + batch))
    grads = []
    for size in (batch, micro):
        model.zero_grad()
        torch.manual_seed(0)
        step = micro_batches(setup, idx, objective, ctx, size, step=5)
        accumulate_gradients(ctx, step, objective)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        # the micro-batches add the same float32 terms in another order, so a single element
        # can move by more than rtol 1e-5 (on an AVX2-only AMD EPYC, 1 of 10,240 by 2.3e-5 of its
        # value): the bound is on each gradient's norm, as for the Trainer (tests/test_hf_stack.py)
        error, size = (grads[1][name] - grads[0][name]).norm(), grads[0][name].norm()
        assert error <= 1e-5 * size, f"{name}: error {float(error):.2e}, norm {float(size):.2e}"


def test_training_starts_at_the_reference_and_bear_at_zero_weight_trains_sdpo(sft_run, tmp_path):
    """From --init the policy is its own reference: the first step's loss is log(1 + M) exactly
    (every reward 0); sdpo-bear with --reg-weight 0 ends at sdpo's weights (the loss test above
    shows the two bit-equal on the same inputs; two training runs in one test process can differ
    in the last bits of their float sums)."""
    data, sft = sft_run
    runs = {}
    losses = {"sdpo": {"loss": "sdpo"}, "zero": {"loss": "sdpo-bear", "reg_weight": 0.0}}
    for name, options in losses.items():
        cfg = tiny_config(data, tmp_path / name, init=str(sft), negatives=3, **options)
        train(cfg)
        runs[name] = tmp_path / name
    log = [json.loads(x) for x in (runs["sdpo"] / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r.get("event") == "step")
    assert first["loss"] == pytest.approx(math.log(4), abs=1e-6)
    a, b = last_weights(runs["sdpo"]), last_weights(runs["zero"])
    for key in a:  # two runs: equal up to the float noise of two processes' allocations
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(sft_run, tmp_path):
    """The negatives are drawn per (seed, step, example): a run stopped after 2 steps and
    resumed reaches the weights of one that was not stopped."""
    data, sft = sft_run
    options = dict(loss="sdpo-bear", init=str(sft), negatives=2, reg_weight=0.5, limit_train=32)
    whole = tiny_config(data, tmp_path / "whole", **options)
    train(whole)
    cut = tmp_path / "cut"
    train(tiny_config(data, cut, max_steps=2, **options))
    train(tiny_config(data, cut, resume=True, **options))
    a, b = last_weights(tmp_path / "whole"), last_weights(cut)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_negatives_are_distinct_never_the_positive_or_history_and_seeded(sft_run, tmp_path):
    _, setup, _ = _setup(sft_run, tmp_path)
    train_rows = setup.data.train
    sampler = NegativeSampler(setup.trie, train_rows, 5, "uniform", seed=1)
    canon = lambda ids: set(setup.trie.canonical(torch.tensor(list(ids))).tolist())  # noqa: E731
    for i, e in enumerate(train_rows):
        got = sampler.sample(e, i, step=3)
        assert len(set(got)) == 5
        assert not set(got) & canon((e.target, *e.history))
        assert got == sampler.sample(e, i, step=3)
    draws = {tuple(sampler.sample(train_rows[0], 0, step)) for step in range(6)}
    assert len(draws) > 1  # a new draw each step
    popular = NegativeSampler(setup.trie, train_rows, 3, "popularity", seed=1)
    seen = canon(i for e in train_rows for i in (e.target, *e.history))
    assert all(set(popular.sample(e, i, 0)) <= seen for i, e in enumerate(train_rows))


def test_too_many_negatives_are_refused_naming_the_row(sft_run, tmp_path):
    _, setup, _ = _setup(sft_run, tmp_path)
    items = setup.trie.num_leaves
    with pytest.raises(ValueError, match=r"--negatives .*train.csv:\d+ leaves \d+ item\(s\)"):
        NegativeSampler(setup.trie, setup.data.train, items, "uniform", seed=0)


def test_the_reference_policy_of_each_start(sft_run, tmp_path):
    """LoRA from fresh adapters: the model itself with its adapters off (no copy); --init: a
    frozen copy of the starting weights, untouched by training steps; the tiny model from
    random weights has none."""
    data, sft = sft_run
    base = tiny_checkpoint(data, tmp_path / "base")
    _, setup, loss = _setup(sft_run, tmp_path, model=str(base), init=None, lr=1e-3)
    assert loss.reference.adapters_disabled and loss.reference.model is setup.model
    _, setup, loss = _setup(sft_run, tmp_path)
    frozen = loss.reference.model
    assert frozen is not setup.model and not any(p.requires_grad for p in frozen.parameters())
    start = {n: p.clone() for n, p in frozen.named_parameters()}
    ctx = StepContext(setup.model.train(), setup.trie, torch.device("cpu"))
    accumulate_gradients(ctx, micro_batches(setup, [0, 1, 2], loss, ctx, 3), loss)
    assert all(torch.equal(p, start[n]) for n, p in frozen.named_parameters())
    with pytest.raises(ValueError, match="no reference policy.*--init RUN"):
        _setup(sft_run, tmp_path, init=None)


def test_init_and_reference_of_another_model_or_catalogue_are_refused(sft_run, tmp_path):
    data, sft = sft_run
    with pytest.raises(ValueError, match="--init .*another model or tokenizer.*--hidden-size"):
        train(tiny_config(data, tmp_path / "a", loss="sdpo", init=str(sft), hidden_size=64))
    other = write_synth(tmp_path / "other", dataclasses.replace(TINY_SYNTH, seed=9))
    with pytest.raises(ValueError, match="--init .*another catalogue"):
        train(tiny_config(other, tmp_path / "b", loss="sdpo", init=str(sft)))
    with pytest.raises(FileNotFoundError, match="--reference .*give a finished run"):
        train(tiny_config(data, tmp_path / "c", loss="sdpo", reference=str(tmp_path)))
    with pytest.raises(ValueError, match="--reference: given with --loss msl"):
        tiny_config(data, tmp_path / "d", loss="msl", reference=str(sft))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused first
