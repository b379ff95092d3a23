"""Decoding speed: bear.decoding.beam_search against generate + prefix_allowed_tokens_fn.

The baseline is the upstream approach: `model.generate(num_beams=B, prefix_allowed_tokens_fn=fn)`
where `fn` walks a Python dict trie for every beam at every step. Both run the same random Llama
(config below), the same left-padded prompts, B = 10, `after` scoring (what generate computes),
length_penalty 0. The run checks, per user, that both return the same items in the same order with
the same scores (generate's artefacts removed: incomplete sequences and -1e9 filler beams).

Catalogues: Office (2.4k items) and Clothing (23k items) of the upstream Amazon data, read by
path (titles tokenised in the response context with a BPE trained on the titles, through
bear.tokenizer / bear.items), and a synthetic catalogue of one million random token sequences with
skewed shared prefixes (no generate baseline there: a dict trie of 1M items does not fit the
budget of this run; said so in the output).

Also measured per catalogue: the trie build time and the per-step cost of the constraint alone
(child gather + log-softmax + top-2B for U*B beams at trie depths 0-3, synthetic logits) for ours,
and generate's PrefixConstrainedLogitsProcessor over the dict trie for the baseline.

`--model smollm2-135m` (or a checkpoint folder / GGUF file) decodes with that pretrained model
instead, float32, its own tokenizer and the paper's prompt (Amazon catalogues only). Every row
also counts the model's forward calls: `forwards_per_call` is the number of sequential forwards
one decoding call of `--batch` users made, the cost that grows with title length.

Writes benchmarks/results/decoding_<device>.csv and .json (benchmarks/_common.py names them).

Usage (full run, on a quiet machine):
    .venv/bin/python benchmarks/decoding_speed.py
Small validation run:
    .venv/bin/python benchmarks/decoding_speed.py --users 16 --synth-items 100000 --tag smoke
A real model:
    .venv/bin/python benchmarks/decoding_speed.py --model smollm2-135m --catalogues Office \
        --users 32 --batch 8 --tag smollm2
Before and after a change, in one run (`git worktree add /tmp/base <commit>` first): add
    --baseline /tmp/base
which times that checkout's beam_search on the same batches, interleaved with this one's and
generate, and compares its lists and scores with this one's (a row of its own).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_results_args,
    device_label,
    from_checkout,
    results_stem,
    timed,
    write_csv,
    write_json,
)
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from bear.checkpoints import resolve_checkpoint
from bear.decoding import beam_search
from bear.decoding.chain_cache import default_chain_limit
from bear.decoding.common import child_logprobs, max_fanout, topk_stable
from bear.items import item_sequences, left_pad
from bear.model import TinyConfig, build_tiny_model
from bear.prompts import format_prompt
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data" / "amazon"  # ../shared/data/amazon of the repo
PAD_ID, EOS_ID = 0, 1  # bear.tokenizer's special tokens


@dataclass(frozen=True)
class Config:
    users: int = 32  # test users per catalogue (first rows of test.csv)
    batch: int = 16  # users per decoding call (same for both methods)
    beam_width: int = 10  # B
    vocab: int = 8192  # BPE vocabulary = model vocabulary
    hidden: int = 256  # Llama hidden size
    layers: int = 4  # Llama layers
    heads: int = 4  # attention heads (key/value heads: the same)
    intermediate: int = 0  # MLP width (0: 2 x hidden)
    history: int = 10  # most recent history items in a prompt
    synth_items: int = 1_000_000  # size of the synthetic catalogue
    constraint_reps: int = 20  # repetitions of the per-step constraint timing
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    catalogues: tuple = ("Office", "Clothing", "synthetic")
    data: str = str(DATA)
    tag: str = ""  # suffix of the results file name (e.g. "smoke")
    model: str = "tiny"  # "tiny" (a random Llama at the size above) or a --model checkpoint
    chain_limit: int | None = None  # beam_search's (None: its device default)
    baseline: str = ""  # another checkout whose beam_search is timed too ("": none)


def load_checkpoint(cfg: Config):
    """(model, tokenizer) of ``cfg.model`` (a --model value of bear train), float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_checkpoint(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.eval().to(cfg.device), tokenizer


def build_model(cfg: Config, vocab: int):
    """bear's tiny Llama at this benchmark's size (4096 positions), float32, in eval mode."""
    size = TinyConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate or 2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=4096,
    )
    return build_tiny_model(vocab, PAD_ID, EOS_ID, size, cfg.seed).eval().to(cfg.device)


def amazon_catalogue(cfg: Config, name: str, tok=None):
    """(sequences, item ids, prompt token lists, vocabulary) for an upstream Amazon dataset; with
    ``tok`` (a checkpoint's tokenizer) that tokenizer, else a BPE trained on the titles."""
    folder = Path(cfg.data) / name
    titles = {int(k): v for k, v in json.loads((folder / "id2name4Rec.json").read_text()).items()}
    domain = name.lower()
    histories = []
    with open(folder / "test.csv") as f:
        for row in csv.DictReader(f):
            items = json.loads(row["item_ids"])
            histories.append([titles[i] for i in items[:-1][-cfg.history :]])
            if len(histories) == cfg.users:
                break
    prompts_text = [format_prompt(h, domain) for h in histories]
    if tok is None:
        tok = train_tokenizer(list(titles.values()) + prompts_text, cfg.vocab)
    seq_of = item_sequences(tok, titles, domain)
    ids = sorted(seq_of)
    prompts = tok(prompts_text, add_special_tokens=True)["input_ids"]
    return [seq_of[i] for i in ids], ids, prompts, len(tok)


def synthetic_catalogue(cfg: Config):
    """One million token sequences of 6-20 tokens; early tokens drawn from skewed distributions so
    that items share prefixes (a brand-like first token, a line-like second token)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.synth_items
    lengths = rng.integers(6, 21, size=n)
    width = int(lengths.max())
    first = 2 + np.minimum(rng.zipf(1.3, size=n), cfg.vocab - 3)
    toks = rng.integers(2, cfg.vocab, size=(n, width))
    toks[:, 0] = first
    toks[:, 1] = 2 + np.minimum(rng.zipf(1.5, size=n) * 7 + first, cfg.vocab - 3)
    seqs = [r[:m].tolist() for r, m in zip(toks, lengths, strict=True)]
    prompts = [
        rng.integers(2, cfg.vocab, size=int(rng.integers(80, 160))).tolist()
        for _ in range(cfg.users)
    ]
    return seqs, list(range(n)), prompts, cfg.vocab


# ------------------------------------------------------------------------------- the baseline
def dict_trie(seqs, eos: int):
    """Upstream-style trie: nested dicts keyed by token, EOS as a key of the last level."""
    root: dict = {}
    for s in seqs:
        node = root
        for t in s:
            node = node.setdefault(t, {})
        node.setdefault(eos, {})
    return root


def make_prefix_fn(root, prompt_len: int, eos: int):
    def fn(batch_id, sent):
        node = root
        for t in sent[prompt_len:].tolist():
            node = node.get(t)
            if node is None:
                return [eos]
        return list(node.keys()) or [eos]

    return fn


def run_generate(model, ids, mask, root, B, max_new, pad: int, eos: int):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=B,
        num_return_sequences=B,
        prefix_allowed_tokens_fn=make_prefix_fn(root, ids.shape[1], eos),
        do_sample=False,
        max_new_tokens=max_new,
        length_penalty=0.0,
        early_stopping=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return out.sequences[:, ids.shape[1] :], out.sequences_scores


def generate_items(gen, scores, item_of, U, B, eos: int):
    """Per user: [(item, score)] of generate's complete catalogue items, minus its artefacts."""
    gen = gen.view(U, B, -1).tolist()
    scores = scores.view(U, B).tolist()
    out = []
    for u in range(U):
        row = []
        for toks, sc in zip(gen[u], scores[u], strict=True):
            if eos not in toks or sc < -1e8:
                continue
            item = item_of.get(tuple(toks[: toks.index(eos)]))
            if item is not None:
                row.append((item, sc))
        out.append(row)
    return out


# ------------------------------------------------------------------------------- measurements
def constraint_cost_ours(trie, cfg: Config, vocab: int, rows: int):
    """ms per step of the constraint alone for `rows` = U*B beams at random inner nodes of depths
    0-3 (the candidate width is the largest fan-out among them, as in beam_search).

    Returns (mean ms over depths, [(depth, width, ms)])."""
    dev = cfg.device
    t_all, per_depth = [], []
    g = torch.Generator().manual_seed(cfg.seed)
    depth = trie.node_depth
    inner = trie.leaf_item < 0
    for d in range(4):
        cand = torch.nonzero((depth == d) & inner).view(-1)
        if cand.numel() == 0:
            continue
        node = cand[torch.randint(cand.numel(), (rows,), generator=g)].to(dev).view(-1, 10)
        logits = torch.randn(node.shape[0], node.shape[1], vocab, generator=g).to(dev)
        width = int(max_fanout(trie, node))

        def step(logits=logits, node=node, width=width):
            logp, _ = child_logprobs(trie, logits, node, width, "after")
            flat = logp.view(node.shape[0], -1)
            return topk_stable(flat, min(2 * node.shape[1], flat.shape[1]))

        t_depth = [timed(step, dev)[1] for _ in range(cfg.constraint_reps + 2)][2:]  # 2 warm-ups
        t_all.extend(t_depth)
        per_depth.append((d, width, round(1e3 * float(np.mean(t_depth)), 3)))
    return 1e3 * float(np.mean(t_all)), per_depth


def constraint_cost_generate(root, seqs, cfg: Config, vocab: int, rows: int, pad, eos) -> float:
    """ms per step of generate's PrefixConstrainedLogitsProcessor over the dict trie, on the
    device the search runs on (its input_ids and scores there, as inside generate)."""
    dev = cfg.device
    rng = np.random.default_rng(cfg.seed)
    P = 4  # a dummy prompt before the prefix
    t_all = []
    for d in range(4):
        picks = [seqs[i] for i in rng.integers(0, len(seqs), size=rows)]
        if any(len(s) < d for s in picks):
            picks = [s for s in picks if len(s) >= d] or picks
            picks = (picks * rows)[:rows]
        sent = torch.tensor([[pad] * P + s[:d] for s in picks if len(s) >= d] or [[pad] * P])
        sent = sent[:rows].to(dev)
        proc = PrefixConstrainedLogitsProcessor(make_prefix_fn(root, P, eos), num_beams=10)
        n = (sent.shape[0] // 10) * 10
        if n == 0:
            continue
        logits = torch.randn(n, vocab).to(dev)

        def step(sent=sent, logits=logits, n=n, proc=proc):
            return proc(sent[:n], torch.log_softmax(logits, -1))

        times = [timed(step, dev)[1] for _ in range(cfg.constraint_reps + 2)]
        t_all.extend(times[2:])  # 2 warm-ups
    return 1e3 * float(np.mean(t_all))


class ForwardCounter:
    """Counts a model's forward calls and the token positions they ran (padding included: the
    work a forward does), read and reset per decoding call."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += ids.numel() if ids is not None else 0

    def take(self) -> tuple[int, int]:
        """(forward calls, token positions) since the last take."""
        out, self.calls, self.tokens = (self.calls, self.tokens), 0, 0
        return out


def baseline_row(ours_row: dict, ours, olds, old_s: float, forwards, path: str) -> dict:
    """The result row of the baseline checkout's beam search: ``ours_row`` (this checkout's row)
    with the baseline's time ``old_s`` over all batches, its (forwards, token positions) per
    call ``forwards``, and its results ``olds`` compared batch by batch with ``ours`` (users with
    the same item lists, and the largest score difference among them)."""
    equal, max_diff, users = 0, 0.0, 0
    for mine, theirs in zip(ours, olds, strict=True):
        same = (mine.item_ids == theirs.item_ids).all(1)  # (U,)
        equal, users = equal + int(same.sum()), users + same.shape[0]
        diff = (mine.scores - theirs.scores)[same].abs().nan_to_num()
        max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
    return dict(
        ours_row,
        method="bear.beam_search (baseline checkout)",
        seconds=round(old_s, 3),
        users_per_s=round(ours_row["users"] / old_s, 3),
        constraint_ms_per_step="",
        constraint_ms_by_depth="",
        forwards_per_call=round(float(np.mean([f for f, _ in forwards])), 1),
        tokens_per_call=round(float(np.mean([t for _, t in forwards])), 1),
        equal_users=f"{equal}/{users}",
        max_abs_score_diff=f"{max_diff:.2e}",
        note=f"--baseline {path}: lists and scores compared with this checkout's",
    )


def bench_catalogue(cfg: Config, name: str, label: str):
    t0 = time.perf_counter()
    pad, eos = PAD_ID, EOS_ID
    if cfg.model != "tiny":
        model, tokenizer = load_checkpoint(cfg)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        eos = tokenizer.eos_token_id
        seqs, ids, prompts, _ = amazon_catalogue(cfg, name, tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
    elif name == "synthetic":
        seqs, ids, prompts, vocab = synthetic_catalogue(cfg)
    else:
        seqs, ids, prompts, vocab = amazon_catalogue(cfg, name)
    prep_s = time.perf_counter() - t0
    if cfg.model == "tiny":
        vocab = max(vocab, cfg.vocab)  # the random Llama's width: at least --vocab
    trie, build_s = timed(
        lambda: ItemTrie(seqs, ids, eos, vocab_size=vocab).to(cfg.device), cfg.device
    )
    print(f"[{name}] {trie}  prep {prep_s:.1f}s  trie build {build_s:.2f}s", flush=True)
    if cfg.model == "tiny":
        model = build_model(cfg, vocab)
    counter = ForwardCounter(model)
    B = cfg.beam_width
    batches = [left_pad(prompts[s : s + cfg.batch], pad) for s in range(0, len(prompts), cfg.batch)]
    batches = [(x.to(cfg.device), m.to(cfg.device)) for x, m in batches]
    rows = cfg.batch * B

    baseline = name != "synthetic"
    if baseline:
        root = dict_trie(seqs, eos)
        canon = trie.canonical(torch.tensor(ids, device=cfg.device)).tolist()
        item_of = {}
        for s, c in zip(seqs, canon, strict=True):
            item_of.setdefault(tuple(s), c)
    max_new = trie.max_len + 1

    # One untimed warm-up call each, then the batches timed alternately (ours, the baseline
    # checkout's, generate), so that load from other processes on a shared machine falls on
    # every method alike.
    limit = {"chain_limit": cfg.chain_limit} if cfg.chain_limit else {}
    ours_call = partial(beam_search, trie=trie, beam_width=B, scoring="after", **limit)
    ours_call(model, *batches[0])
    if cfg.baseline:
        trie_cls, search = from_checkout(cfg.baseline, "bear.trie:ItemTrie",
                                         "bear.decoding:beam_search")  # fmt: skip
        old_trie = trie_cls(seqs, ids, eos, vocab_size=vocab).to(cfg.device)
        old_call = partial(search, trie=old_trie, beam_width=B, scoring="after", **limit)
        old_call(model, *batches[0])
    if baseline:
        run_generate(model, *batches[0], root, B, max_new, pad, eos)
    counter.take()
    ours, gens, ours_s, gen_s = [], [], 0.0, 0.0
    olds, old_s, old_forwards = [], 0.0, []
    ours_forwards, gen_forwards = [], []  # sequential forwards of each decoding call
    for x, m in batches:
        r, dt = timed(lambda x=x, m=m: ours_call(model, x, m), cfg.device)
        ours.append(r)
        ours_s += dt
        ours_forwards.append(counter.take())
        if cfg.baseline:
            r, dt = timed(lambda x=x, m=m: old_call(model, x, m), cfg.device)
            olds.append(r)
            old_s += dt
            old_forwards.append(counter.take())
        if baseline:
            g, dt = timed(
                lambda x=x, m=m: run_generate(model, x, m, root, B, max_new, pad, eos), cfg.device
            )
            gens.append(g)
            gen_s += dt
            gen_forwards.append(counter.take())
    ours_ms, ours_depths = constraint_cost_ours(trie, cfg, vocab, rows)
    base = dict(
        device=label,
        catalogue=name,
        items=trie.num_items,
        leaves=trie.num_leaves,
        nodes=trie.num_nodes,
        vocab=vocab,
        max_item_tokens=trie.max_len,
        root_fanout=trie.depth_fanout_list[0],
        users=len(prompts),
        batch=cfg.batch,
        beam_width=B,
        trie_build_s=round(build_s, 3),
        model=cfg.model,
    )
    out = [
        dict(
            base,
            method="bear.beam_search",
            seconds=round(ours_s, 3),
            users_per_s=round(len(prompts) / ours_s, 3),
            constraint_ms_per_step=round(ours_ms, 3),
            constraint_ms_by_depth=" ".join(f"d{d}:F={w}:{ms}ms" for d, w, ms in ours_depths),
            forwards_per_call=round(float(np.mean([f for f, _ in ours_forwards])), 1),
            tokens_per_call=round(float(np.mean([t for _, t in ours_forwards])), 1),
            chain_limit=cfg.chain_limit or default_chain_limit(cfg.device),
            equal_users="",
            max_abs_score_diff="",
            note="",
        )
    ]
    print(f"[{name}] ours: {len(prompts) / ours_s:.2f} users/s, constraint {ours_ms:.3f} ms/step")
    if cfg.baseline:
        out.append(baseline_row(out[0], ours, olds, old_s, old_forwards, cfg.baseline))
        print(
            f"[{name}] baseline checkout: {len(prompts) / old_s:.2f} users/s; ours "
            f"{old_s / ours_s:.2f}x as fast; {out[-1]['equal_users']} identical lists"
        )

    if not baseline:
        out.append(
            dict(
                base,
                method="generate+prefix_allowed_tokens_fn",
                seconds="",
                users_per_s="",
                constraint_ms_per_step="",
                constraint_ms_by_depth="",
                forwards_per_call="",
                tokens_per_call="",
                chain_limit="",
                equal_users="",
                max_abs_score_diff="",
                note="skipped: a Python dict trie of this catalogue exceeds this run's budget",
            )
        )
        print(f"[{name}] generate baseline skipped (dict trie too large)")
        return out

    gen_ms = constraint_cost_generate(root, seqs, cfg, vocab, rows, pad, eos)

    equal, max_diff = 0, 0.0
    for (x, _), r, (g, sc) in zip(batches, ours, gens, strict=True):
        hf = generate_items(g, sc, item_of, x.shape[0], B, eos)
        for u in range(x.shape[0]):
            mine = [
                (i, s)
                for i, s in zip(r.item_ids[u].tolist(), r.scores[u].tolist(), strict=True)
                if i >= 0
            ]
            same = [i for i, _ in mine] == [i for i, _ in hf[u]]
            equal += same
            if same:
                for (_, a), (_, b) in zip(mine, hf[u], strict=True):
                    max_diff = max(max_diff, abs(a - b))
    out.append(
        dict(
            base,
            method="generate+prefix_allowed_tokens_fn",
            seconds=round(gen_s, 3),
            users_per_s=round(len(prompts) / gen_s, 3),
            constraint_ms_per_step=round(gen_ms, 3),
            constraint_ms_by_depth="",
            forwards_per_call=round(float(np.mean([f for f, _ in gen_forwards])), 1),
            tokens_per_call=round(float(np.mean([t for _, t in gen_forwards])), 1),
            chain_limit="",
            equal_users=f"{equal}/{len(prompts)}",
            max_abs_score_diff=f"{max_diff:.2e}",
            note="",
        )
    )
    out[0]["equal_users"] = f"{equal}/{len(prompts)}"
    out[0]["max_abs_score_diff"] = f"{max_diff:.2e}"
    if cfg.baseline:
        out[1]["note"] += f"; against generate: {gen_s / old_s:.1f}x"
    print(
        f"[{name}] generate: {len(prompts) / gen_s:.2f} users/s, constraint {gen_ms:.3f} ms/step;"
        f" speed-up {gen_s / ours_s:.1f}x; identical top-{B} lists {equal}/{len(prompts)}, "
        f"max |score diff| {max_diff:.2e}",
        flush=True,
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Config()
    p.add_argument("--users", type=int, default=defaults.users, help="test users per catalogue")
    p.add_argument("--batch", type=int, default=defaults.batch, help="users per decoding call")
    p.add_argument("--synth-items", type=int, default=defaults.synth_items, help="synthetic size")
    p.add_argument("--device", default=defaults.device, help="cpu or cuda")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="Llama hidden size")
    p.add_argument("--heads", type=int, default=defaults.heads, help="Llama attention heads")
    p.add_argument("--intermediate", type=int, default=defaults.intermediate,
                   help="Llama MLP width (0: 2 x hidden)")  # fmt: skip
    p.add_argument("--layers", type=int, default=defaults.layers, help="Llama layers")
    p.add_argument("--history", type=int, default=defaults.history, help="history items/prompt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument(
        "--catalogues",
        nargs="+",
        help="any of Office Clothing synthetic (default all three; Office Clothing with --model)",
    )
    p.add_argument("--data", default=defaults.data, help="folder holding Office/ and Clothing/")
    p.add_argument(
        "--model",
        default=defaults.model,
        help="tiny (a random Llama of --hidden/--layers, default) or a pretrained checkpoint as "
        "bear train's --model takes it (smollm2-135m, a folder, FILE.gguf); Amazon catalogues only",
    )
    p.add_argument("--chain-limit", type=int, default=0,
                   help="beam_search's chain_limit: the most tokens of one forced chain fed in one "
                   "forward (0: its device default, 1 on a CPU, 16 on a GPU)")  # fmt: skip
    p.add_argument("--baseline", default="",
                   help="another checkout (a folder holding its bear/) whose beam_search is timed "
                   "too, interleaved, and compared list by list with this one's")  # fmt: skip
    add_results_args(p)
    a = p.parse_args(argv)
    if a.catalogues is None:
        a.catalogues = list(defaults.catalogues) if a.model == "tiny" else ["Office", "Clothing"]
    if a.model != "tiny" and "synthetic" in a.catalogues:
        p.error("--model: the synthetic catalogue's random tokens fit only the tiny model; give "
                "--catalogues Office or Clothing")  # fmt: skip
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config(
        users=a.users,
        batch=a.batch,
        synth_items=a.synth_items,
        device=a.device,
        hidden=a.hidden,
        heads=a.heads,
        intermediate=a.intermediate,
        layers=a.layers,
        history=a.history,
        catalogues=tuple(a.catalogues),
        data=a.data,
        tag=a.tag,
        model=a.model,
        chain_limit=a.chain_limit or None,
        baseline=a.baseline,
    )
    label = device_label(cfg.device)
    print(f"config: {asdict(cfg)}\ndevice: {label}")
    rows = []
    stem = results_stem(a.results_dir, "decoding", label, cfg.tag)
    for name in cfg.catalogues:
        rows.extend(bench_catalogue(cfg, name, label))
        # after every catalogue: a run cut short keeps what it measured
        write_csv(stem.with_suffix(".csv"), rows)
        meta = dict(config=asdict(cfg), device=label, torch_threads=torch.get_num_threads(),
                    rows=rows)  # fmt: skip
        write_json(stem.with_suffix(".json"), meta)
        print(f"[{name}] wrote {stem}.csv and .json", flush=True)


if __name__ == "__main__":
    main()
