"""Teacher-forced item scores (``bear.decoding.score_items``) per item: this checkout against a
baseline checkout, on one model, the same prompts, the same items, with the scores compared.

Office's first test users with the paper's prompt (their last --history purchases), --items
catalogue items per user (the target and random others), "after" scoring. The model is the tiny
Llama (a BPE trained on the titles) or a checkpoint (``smollm2-135m``: SmolLM2-135M-Instruct,
float32, no adapter), built once and run by both versions; each version builds its own trie
from the same token sequences. Writes results/score_items_<device>[_<tag>].json.

    PYTHONPATH=. python benchmarks/score_items_speed.py --model smollm2-135m --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_results_args, device_label, from_checkout, results_stem, write_json

from bear.checkpoints import resolve_checkpoint
from bear.data import load_dataset
from bear.items import encode_prompts, item_sequences, left_pad
from bear.model import TinyConfig, build_tiny_model
from bear.tokenizer import train_tokenizer


def _model(name: str, data):
    """(model, tokenizer): the tiny Llama on a BPE of the titles, or a float32 checkpoint."""
    if name == "tiny":
        tokenizer = train_tokenizer(list(data.titles.values()), 2048)
        special = (tokenizer.pad_token_id, tokenizer.eos_token_id)
        return build_tiny_model(len(tokenizer), *special, TinyConfig(), seed=0).eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_checkpoint(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/amazon/Office", help="dataset folder")
    p.add_argument("--model", default="tiny", help="tiny or a checkpoint (smollm2-135m)")
    p.add_argument("--users", type=int, default=4, help="test users")
    p.add_argument("--items", type=int, default=8, help="items scored per user")
    p.add_argument("--history", type=int, default=10, help="history items per prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--baseline", help="another checkout whose score_items is timed too")
    add_results_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, max_history=args.history)
    model, tokenizer = _model(args.model, data)
    rows = data.test[: args.users]
    input_ids, mask = left_pad(encode_prompts(tokenizer, data, rows), tokenizer.pad_token_id)
    sequences = item_sequences(tokenizer, data.titles, data.prompt)
    ids = sorted(sequences)
    g = torch.Generator().manual_seed(0)
    others = torch.tensor(ids)[torch.randint(0, len(ids), (len(rows), args.items - 1), generator=g)]
    items = torch.cat([torch.tensor([[r.target] for r in rows]), others], dim=1)  # (U, M)
    vocab = model.get_output_embeddings().weight.shape[0]
    out = {"device": device_label("cpu"), "model": args.model, "data": args.data,
           "users": len(rows), "items_per_user": args.items,
           "prompt_tokens": int(mask.sum(1).float().mean())}  # fmt: skip
    scores = {}
    for name, path in [("this", None)] + ([("baseline", args.baseline)] if args.baseline else []):
        trie_cls, score_items = from_checkout(
            path, "bear.trie:ItemTrie", "bear.decoding:score_items"
        )
        trie = trie_cls([sequences[i] for i in ids], ids, tokenizer.eos_token_id, vocab)
        start = time.perf_counter()
        scores[name] = score_items(model, input_ids, mask, trie, items, "after")
        seconds = time.perf_counter() - start
        out[f"{name}_s_per_item"] = seconds / items.numel()
        print(
            f"{name}: {seconds:.1f} s, {1e3 * seconds / items.numel():.1f} ms per item", flush=True
        )
    if "baseline" in scores:
        out["speedup"] = out["baseline_s_per_item"] / out["this_s_per_item"]
        out["max_abs_score_difference"] = float((scores["this"] - scores["baseline"]).abs().max())
    stem = results_stem(args.results_dir, "score_items", out["device"], args.tag)
    write_json(stem.with_suffix(".json"), out)
    print(out)


if __name__ == "__main__":
    main()
