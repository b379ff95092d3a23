"""bear.decoding.blocked_head: target log-probabilities from last hidden states with the output
layer applied a block at a time, and the once-per-model proof that a model's logits are its
head's (score_items reads items through it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CohereConfig, CohereForCausalLM

import bear.decoding.blocked_head as blocked_head
import bear.decoding.chain_cache as chain_cache
import bear.decoding.teacher_forcing as teacher_forcing
from bear.decoding import beam_search, score_items
from bear.decoding.blocked_head import hidden_forward, plain_head, target_log_softmax
from bear.trie import ItemTrie
from tests._helpers_decoding import EOS, PAD, VOCAB, build, prompts, tiny_model


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows and 7 tokens: every shape below spans several, most end part-filled."""
    monkeypatch.setattr(blocked_head, "ROWS_PER_BLOCK", 3)
    monkeypatch.setattr(blocked_head, "VOCAB_PER_BLOCK", 7)


def _head(H: int, V: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.mul_(4.0)
    return head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("N", "H", "V"), [(1, 1, 1), (10, 5, 50), (4, 16, 7), (13, 3, 8)])
def test_blocked_target_log_softmax_is_the_full_one(small_blocks, N, H, V, bias):
    """log_softmax(h W^T + b)[y] over every token and over an allowed subset (narrower than V:
    the tokens past it never count), in float32 within torch's own float32 error."""
    head = _head(H, V, bias, seed=N + V)
    g = torch.Generator().manual_seed(V)
    h, y = torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        z = head(h)  # (N, V)
        got = target_log_softmax(h, head, y)
        assert got.dtype == torch.float32 and got.shape == (N,)
        torch.testing.assert_close(got, z.log_softmax(-1).gather(1, y[:, None]).squeeze(1))
        width = max(1, V - 2)
        allowed = torch.rand(N, width, generator=g) < 0.5  # (N, V - 2)
        y = y.clamp(max=width - 1)
        allowed[torch.arange(N), y] = True
        masked = z.masked_fill(~F.pad(allowed, (0, V - width)), float("-inf"))
        want = masked.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(target_log_softmax(h, head, y, allowed), want)


@pytest.mark.parametrize(
    "case",
    ["plus_inf", "all_minus_inf", "nan", "target_minus_inf", "huge", "late_finite", "all_masked"],
)
def test_infinite_and_nan_logits_give_what_the_full_log_sum_exp_gives(small_blocks, case):
    """Special logits (set through the bias) give what ``_target_log_softmax`` gives on the full
    logits: NaN for a +inf or NaN logit or no finite logit, -inf for a target of logit -inf.
    "late_finite": the first two blocks all -inf and the finite logits very negative (the
    running sum must not rescale 0 by exp(+1000), which is NaN)."""
    V, N = 20, 5
    head = _head(2, V, bias=True, seed=0)
    y = torch.tensor([16, 17, 18, 19, 15])
    allowed = None
    with torch.no_grad():
        if case == "plus_inf":
            head.bias[5] = float("inf")
        elif case == "all_minus_inf":
            head.bias.fill_(float("-inf"))
        elif case == "nan":
            head.bias[3] = float("nan")
        elif case == "target_minus_inf":
            head.bias[y[0]] = float("-inf")
        elif case == "huge":
            head.bias[0] = 3e38
        elif case == "late_finite":
            head.bias[:14] = float("-inf")
            head.bias[14:] = -1000.0
        else:  # every allowed logit -inf
            head.bias[y] = float("-inf")
            allowed = torch.zeros(N, V, dtype=torch.bool)
            allowed[torch.arange(N), y] = True
        h = torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
        z = head(h)  # (N, V)
        if allowed is not None:
            z = z.masked_fill(~allowed, float("-inf"))
        want = teacher_forcing._target_log_softmax(z.gather(1, y[:, None]).squeeze(1), z)
        got = target_log_softmax(h, head, y, allowed)
    torch.testing.assert_close(got, want, equal_nan=True)
    if case == "late_finite":
        assert torch.isfinite(got).all()
    if case in ("plus_inf", "all_minus_inf", "nan", "all_masked"):
        assert got.isnan().all()
    if case == "target_minus_inf":
        assert got[0] == float("-inf") and torch.isfinite(got[1:]).all()


def test_a_plain_head_is_proved_once_and_hidden_forwards_compute_no_logits():
    """The proof has the model compute its logits at one position, once per model; a hidden
    forward computes no logits, and its hidden states are the ones the model's
    logits come from."""
    model = tiny_model(seed=5)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head = plain_head(model, x[:1, -3:])
        assert head is model.lm_head and plain_head(model, x[:1]) is head
        out, h = hidden_forward(model, input_ids=x)
        hook.remove()
        logits = model(input_ids=x).logits
    H = model.config.hidden_size
    assert seen == [(1, 1, H), (2, 0, H)]  # the model's head at one position, then at none
    assert out.logits.shape == (2, 0, VOCAB) and h.shape == (2, 6, H)
    torch.testing.assert_close(head(h), logits)


def _scaled_logits_model() -> CohereForCausalLM:
    """A model whose logits are its head's times a logit scale (Cohere's ``logit_scale``)."""
    torch.manual_seed(0)
    config = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          logit_scale=0.5, pad_token_id=PAD, eos_token_id=EOS,
                          bos_token_id=1)  # fmt: skip
    return CohereForCausalLM(config).eval()


def _full_logits_scores(monkeypatch, *args) -> torch.Tensor:
    """score_items through the model's own logits (no head: the path before blocked_head)."""
    with monkeypatch.context() as m:
        m.setattr(teacher_forcing, "plain_head", lambda model, token_ids: None)
        return score_items(*args)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_a_model_that_scales_its_logits_is_scored_from_its_own_logits(monkeypatch, scoring):
    """Scoring a logit-scaled model from its head would drop the scale: the proof tells it
    apart (plain_head None, remembered) and score_items uses the model's logits."""
    model = _scaled_logits_model()
    assert plain_head(model, torch.tensor([[3, 4]])) is None
    assert blocked_head._PLAIN_HEAD[model] is False  # remembered: not proved again
    model = _scaled_logits_model()  # a model never proved: score_items finds out itself
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    pick = torch.tensor([ids[:6]] * 3)
    got = score_items(model, input_ids, mask, trie, pick, scoring)
    want = _full_logits_scores(monkeypatch, model, input_ids, mask, trie, pick, scoring)
    assert torch.equal(got, want)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_score_items_from_hidden_states_equals_the_full_logits_path(
    small_blocks, monkeypatch, scoring
):
    """Items of every length, blocks of 3 rows and 7 tokens: the same scores as the model's own
    logits give, to float32 rounding."""
    model = tiny_model(seed=1)
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    pick = torch.tensor([ids[::3][:10], ids[1::3][:10], ids[2::3][:10]])
    got = score_items(model, input_ids, mask, trie, pick, scoring)
    want = _full_logits_scores(monkeypatch, model, input_ids, mask, trie, pick, scoring)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", [tiny_model, _scaled_logits_model])
def test_beam_search_from_hidden_states_equals_the_logits_path(small_blocks, monkeypatch, make):
    """Under "after" scoring the chain cache scores fed chains from their hidden states when the
    model's head is plain (the tiny Llama: several blocks of rows and tokens), from its logits
    otherwise (the logit-scaled model, which a wrong proof would score without its scale): the
    same items and scores as the logits path in both cases."""
    model = make()
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    got = beam_search(model, input_ids, mask, trie, 5, "after")
    with monkeypatch.context() as m:
        m.setattr(chain_cache, "plain_head", lambda model, token_ids: None)
        want = beam_search(model, input_ids, mask, trie, 5, "after")
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def _teacher_forced(model, input_ids, mask, seqs, ids, pick, scoring) -> torch.Tensor:
    """(U, M) float64 oracle: each prompt + title run whole, log p summed step by step over
    every token ("after") or over the trie's children of the prefix ("before")."""
    item_of = dict(zip(ids, seqs, strict=True))
    children = {}  # prefix -> allowed next tokens (a test oracle, so a plain dict)
    for s in seqs:
        for t in range(len(s) + 1):
            children.setdefault(tuple(s[:t]), set()).add(s[t] if t < len(s) else EOS)
    out = torch.zeros(pick.shape, dtype=torch.float64)
    for u in range(pick.shape[0]):
        prompt = input_ids[u, mask[u].bool()]
        for j, item in enumerate(pick[u].tolist()):
            target = item_of[item] + [EOS]
            x = torch.cat([prompt, torch.tensor(target[:-1])])[None]
            with torch.no_grad():
                z = model(input_ids=x).logits[0, len(prompt) - 1 :].double()
            for t, y in enumerate(target):
                if scoring == "before":
                    allowed = torch.tensor(sorted(children[tuple(target[:t])]))
                    out[u, j] += z[t, y] - torch.logsumexp(z[t, allowed], 0)
                else:
                    out[u, j] += z[t].log_softmax(0)[y]
    return out


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_a_head_with_a_bias_and_a_root_with_one_child_score_as_teacher_forcing(scoring):
    """A plain head with a bias is scored from hidden states (its bias included), and a
    catalogue whose titles all start with one token (the root has one child: step 0 is 0
    under "before") scores as the oracle does."""
    model = tiny_model(seed=2)
    torch.manual_seed(0)
    biased = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        biased.weight.copy_(model.lm_head.weight)
        biased.bias.normal_(0.0, 3.0)
    model.lm_head = biased
    seqs, ids, _ = build()
    seqs = [[5] + s for s in seqs]  # every title starts with token 5
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    assert int(trie.child_ptr[1] - trie.child_ptr[0]) == 1
    input_ids, mask = prompts((7, 4, 9))
    pick = torch.tensor([ids[:5], ids[5:10], ids[10:15]])
    got = score_items(model, input_ids, mask, trie, pick, scoring)
    assert plain_head(model, input_ids[:1, -1:]) is biased
    want = _teacher_forced(model, input_ids, mask, seqs, ids, pick, scoring)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_a_hook_that_changes_the_heads_output_is_not_a_plain_head():
    """A forward hook on the output layer that adds to its logits: the model's logits are not
    the layer's weight applied to its hidden states, so no plain head (an observing hook, as in
    the proof test above, leaves it plain)."""
    model = tiny_model(seed=3)
    model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    assert plain_head(model, torch.tensor([[3, 4, 5]])) is None


def test_a_bfloat16_model_that_casts_its_logits_is_scored_from_hidden_states(monkeypatch):
    """A bfloat16 model whose logits are cast to float32 after the layer still has a plain
    head; its scores from hidden states are those of its own logits, to bfloat16 rounding."""
    model = tiny_model(seed=4).to(torch.bfloat16)
    model.lm_head.register_forward_hook(lambda module, args, out: out.float())
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    assert plain_head(model, input_ids[:1, -1:]) is model.lm_head
    pick = torch.tensor([ids[:6]] * 3)
    for scoring in ("before", "after"):
        got = score_items(model, input_ids, mask, trie, pick, scoring)
        want = _full_logits_scores(monkeypatch, model, input_ids, mask, trie, pick, scoring)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(2, 3), (1, 0), (3,)])
def test_plain_head_refuses_token_ids_that_are_not_one_prompt(shape):
    with pytest.raises(ValueError, match=r"token_ids: expected \(1, t\)"):
        plain_head(tiny_model(), torch.zeros(shape, dtype=torch.int64))


def test_the_blocked_log_softmax_is_as_accurate_as_torchs_float32_one(small_blocks, monkeypatch):
    """Against a float64 ground truth, the blocked float32 log-sum-exp errs no more than twice
    what torch's float32 log_softmax errs on the same logits, at worst and on average (random
    logits of std 3.6, as SmolLM2's on Office prompts; V = 6,000, blocks of 512 tokens)."""
    monkeypatch.setattr(blocked_head, "VOCAB_PER_BLOCK", 512)
    torch.manual_seed(0)
    head = nn.Linear(96, 6000, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.37)
        h = torch.randn(40, 96)
        y = torch.randint(0, 6000, (40,))
        exact = (h.double() @ head.weight.double().T).log_softmax(-1)
        exact = exact.gather(1, y[:, None]).squeeze(1)
        torch_error = (head(h).log_softmax(-1).gather(1, y[:, None]).squeeze(1) - exact).abs()
        blocked_error = (target_log_softmax(h, head, y).double() - exact).abs()
    assert blocked_error.max() <= 2 * torch_error.max()
    assert blocked_error.mean() <= 2 * torch_error.mean()


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_a_nan_logit_leaves_the_head_plain_and_scores_as_the_logits_path(monkeypatch, scoring):
    """A token whose logit is NaN (its weight row NaN) does not make the model's head look
    post-processed (NaN equals NaN in the proof); the scores from hidden states have their NaN
    where the logits path has them."""
    model = tiny_model(seed=6)
    with torch.no_grad():
        model.lm_head.weight[VOCAB - 1] = float("nan")  # a token no item uses
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    assert plain_head(model, input_ids[:1, -1:]) is model.lm_head
    pick = torch.tensor([ids[:6]] * 3)
    got = score_items(model, input_ids, mask, trie, pick, scoring)
    want = _full_logits_scores(monkeypatch, model, input_ids, mask, trie, pick, scoring)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert got.isnan().all() == (scoring == "after")  # "before" never reads that token


def test_a_lone_childs_logit_past_float16_range_scores_nan_as_its_logits_do(monkeypatch):
    """Under "before", a lone child's log p is 0 for a finite logit and NaN for an infinite
    one: a float16 model whose logit for such a token overflows scores the item NaN from
    hidden states as from its logits, and the other items alike."""
    seqs = [[3, 20, 5], [4, 6], [4, 7]]  # token 20 is only ever a lone child
    ids = [0, 1, 2]
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    model = tiny_model(seed=7).to(torch.float16)
    with torch.no_grad():
        model.lm_head.weight[20] = 3e4  # its logit past float16's largest, 65,504
    input_ids, mask = prompts((7, 4, 9))
    pick = torch.tensor([ids] * 3)
    got = score_items(model, input_ids, mask, trie, pick, "before")
    want = _full_logits_scores(monkeypatch, model, input_ids, mask, trie, pick, "before")
    assert got[:, 0].isnan().all() and want[:, 0].isnan().all()
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-2, atol=1e-2)
