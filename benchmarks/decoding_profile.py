"""Where one `beam_search` call's time goes: the prompts' prefill, the chain cache's fed
forwards, the output layer applied to fed positions' hidden states (`blocked_head`), and the
rest (the search's own steps), with the token positions each part runs against the real ones.

The first --users Office test users (the paper's prompt, their last --history purchases) in one
call, B = 10, "after" scoring, after one untimed warm-up call. Positions: the prefill runs the
prompts' shared head once and every prompt's own tokens left-padded to the longest; a fed
forward runs every user's row padded to the user with the most chain tokens. The model is a
checkpoint (``smollm2-135m``: SmolLM2-135M-Instruct, float32) or a path to one. Writes
results/decoding_profile_<device>[_<tag>].json.

    PYTHONPATH=. python benchmarks/decoding_profile.py --model smollm2-135m --users 16 --history 3
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_results_args, device_label, results_stem, write_json
from decoding_speed import Config, amazon_catalogue, load_checkpoint

import bear.decoding.chain_cache as chain_cache
from bear.decoding import beam_search
from bear.decoding.prompt_cache import shared_head_length
from bear.items import left_pad
from bear.trie import ItemTrie

B = 10  # beam width


PARTS = {  # part of a call -> what is timed: (owner, attribute), patched while Parts is entered
    "prefill": (chain_cache, "prefilled"),
    "fed forwards": (chain_cache.ChainKVCache, "_forward"),
    "output layer": (chain_cache, "target_log_softmax"),
}


class Parts:
    """Seconds spent in the chain cache's prefill, its fed forwards and the blocked output layer
    that scores forced tokens from their hidden states (``PARTS``, while the object is used as a
    context), and the fed forwards' positions."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.forwards, self.run_positions, self.chain_tokens = 0, 0, 0
        self._original = {name: getattr(owner, attr) for name, (owner, attr) in PARTS.items()}

    def __enter__(self):
        for name, (owner, attr) in PARTS.items():
            f = (
                self._counted(self._original[name])
                if name == "fed forwards"
                else self._original[name]
            )
            setattr(owner, attr, self._timed(name, f))
        return self

    def __exit__(self, *exc):
        for name, (owner, attr) in PARTS.items():
            setattr(owner, attr, self._original[name])

    def _counted(self, forward):
        def counted(cache, user, beam, chain, length, *rest, **kwargs):
            per_user = torch.zeros(cache.lineage.shape[0], dtype=torch.int64)
            per_user = per_user.index_add_(0, user.cpu(), length.cpu())
            self.forwards += 1
            self.run_positions += int(per_user.shape[0] * per_user.max())
            self.chain_tokens += int(length.sum())
            return forward(cache, user, beam, chain, length, *rest, **kwargs)

        return counted

    def _timed(self, name, f):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a checkpoint: smollm2-135m or a path")
    p.add_argument("--data", default=Config.data, help="folder of the Amazon datasets")
    p.add_argument("--users", type=int, default=16, help="Office test users, all in one call")
    p.add_argument("--history", type=int, default=3, help="history items per prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    add_results_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config(model=args.model, users=args.users, history=args.history, data=args.data,
                 device="cpu")  # fmt: skip
    model, tokenizer = load_checkpoint(cfg)
    seqs, ids, prompts, _ = amazon_catalogue(cfg, "Office", tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    trie = ItemTrie(seqs, ids, tokenizer.eos_token_id, vocab_size=vocab)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(prompts, pad)
    beam_search(model, input_ids, mask, trie, B, scoring="after")  # warm-up, untimed
    with Parts() as parts:
        start = time.perf_counter()
        beam_search(model, input_ids, mask, trie, B, scoring="after")
        total = time.perf_counter() - start
    head = shared_head_length(input_ids, mask)
    own = mask.sum(1) - head  # (U,) each prompt's own tokens
    seconds = {name: round(s, 3) for name, s in parts.seconds.items()}
    seconds["rest"] = round(total - sum(parts.seconds.values()), 3)
    out = {"device": device_label("cpu"), "model": args.model, "users": len(prompts),
           "history": args.history, "beam_width": B, "scoring": "after",
           "threads": args.threads, "total_s": round(total, 3), "seconds": seconds,
           "prefill_positions_run": head + len(prompts) * int(own.max()),
           "prefill_positions_real": head + int(own.sum()), "shared_head": head,
           "fed_forwards": parts.forwards, "fed_positions_run": parts.run_positions,
           "fed_positions_real": parts.chain_tokens}  # fmt: skip
    print(out, flush=True)
    stem = results_stem(args.results_dir, "decoding_profile", out["device"], args.tag)
    write_json(stem.with_suffix(".json"), out)
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
