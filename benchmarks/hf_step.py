"""Peak memory and step time of a `transformers.Trainer` step: apply_bear_loss against full logits.

A random Llama (V = 49152, SmolLM2's vocabulary; a small, configurable depth and width) with LoRA
on q_proj / v_proj trains on prompts of --prompt-len tokens followed by --response-len response
tokens (an item of a random catalogue, EOS included), as in an LLM recommender. Variants:

    default-ce            Trainer's own loss: the model's ForCausalLMLoss, full (batch, T, V) logits
    compute_loss_func     Trainer(compute_loss_func=bear_compute_loss_func(mask)): BEAR, full logits
    apply_bear_loss-sft   apply_bear_loss(model), reg_weight=0: cross-entropy, supervised rows only
    apply_bear_loss-bear  apply_bear_loss(model, trie mask): BEAR, supervised rows only

Each variant runs in its own process (a clean peak-memory counter): one warm-up step, then --steps
timed steps (median wall-clock seconds, and median CPU seconds of the process, which a shared
machine disturbs less). Memory: on CUDA, torch.cuda.max_memory_allocated over the timed
steps; on a CPU, the process's peak RSS (ru_maxrss) minus its RSS before training. Writes
results/hf_step_<device>.csv.

    python benchmarks/hf_step.py                 # the CPU run of benchmarks/README.md
    python benchmarks/hf_step.py --batch-size 8  # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import add_results_args, device_label, results_stem, write_csv

VARIANTS = ("default-ce", "compute_loss_func", "apply_bear_loss-sft", "apply_bear_loss-bear")
PAD, EOS = 0, 2  # token ids of the random model
BEAR_OPTIONS = dict(beam_width=10, reg_weight=1.0, reg_temperature=1.0)  # paper defaults


def build(args):
    """(LoRA model, trie, examples) for one variant, seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bear.trie import ItemTrie

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        max_position_embeddings=args.prompt_len + args.response_len,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    item_len = args.response_len - 1  # + EOS
    items = torch.randint(3, args.vocab_size, (args.num_items, item_len), generator=gen)
    trie = ItemTrie(items.tolist(), range(args.num_items), EOS, args.vocab_size)
    n = args.batch_size * (args.steps + 1)
    prompts = torch.randint(3, args.vocab_size, (n, args.prompt_len), generator=gen)
    targets = torch.randint(0, args.num_items, (n,), generator=gen)
    examples = []
    for prompt, item in zip(prompts.tolist(), targets.tolist(), strict=True):
        response = items[item].tolist() + [EOS]
        examples.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return model, trie, examples


def collate(features):
    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features]),
        "attention_mask": torch.ones(
            len(features), len(features[0]["input_ids"]), dtype=torch.long
        ),
        "labels": torch.tensor([f["labels"] for f in features]),
    }


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args) -> dict:
    """One variant in this process: seconds per timed step and peak memory (MB)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bear_kernels.transformers import apply_bear_loss, bear_compute_loss_func

    model, trie, examples = build(args)
    cuda = torch.cuda.is_available()
    kwargs = {}
    if args.variant == "compute_loss_func":
        kwargs["compute_loss_func"] = bear_compute_loss_func(
            trie.to("cuda" if cuda else "cpu").labels_allowed_mask, **BEAR_OPTIONS
        )
    elif args.variant == "apply_bear_loss-sft":
        apply_bear_loss(model, reg_weight=0.0)
    elif args.variant == "apply_bear_loss-bear":
        mask_fn = trie.to("cuda" if cuda else "cpu").labels_allowed_mask
        apply_bear_loss(model, allowed_mask_fn=mask_fn, **BEAR_OPTIONS)

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu_seconds, self.start, self.cpu_start = [], [], 0.0, 0.0

        def on_step_begin(self, targs, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                if state.global_step == 1:  # after the warm-up step
                    torch.cuda.reset_peak_memory_stats()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, targs, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > 1:
                self.seconds.append(time.perf_counter() - self.start)
                self.cpu_seconds.append(time.process_time() - self.cpu_start)

    timer = Timer()
    targs = TrainingArguments(
        output_dir=args.out_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=examples,
        data_collator=collate,
        callbacks=[timer],
        **kwargs,
    )
    before = rss_mb()
    trainer.train()
    if cuda:
        peak, measure = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak, measure = peak_rss - before, "peak RSS minus RSS before training"
    return {
        "step_s": statistics.median(timer.seconds),
        "step_cpu_s": statistics.median(timer.cpu_seconds),
        "peak_mb": peak,
        "memory": measure,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (no accumulation)")
    p.add_argument("--prompt-len", type=int, default=400, help="prompt tokens per example")
    p.add_argument("--response-len", type=int, default=30, help="response tokens (EOS included)")
    p.add_argument("--vocab-size", type=int, default=49152, help="V (SmolLM2's)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width (heads of 64)")
    p.add_argument("--num-layers", type=int, default=4, help="decoder blocks")
    p.add_argument("--num-items", type=int, default=2000, help="catalogue size of the trie")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    add_results_args(p)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--out-dir", default="/tmp/bear_hf_step", help="Trainer output_dir (unused)")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    device = device_label("auto")
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant]
        for name in ("batch_size", "prompt_len", "response_len", "vocab_size", "hidden_size"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        cmd += ["--num-layers", str(args.num_layers), "--num-items", str(args.num_items)]
        cmd += ["--steps", str(args.steps), "--out-dir", args.out_dir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        full = variant in ("default-ce", "compute_loss_func")
        length = args.prompt_len + args.response_len
        row = {
            "device": device,
            "variant": variant,
            "batch": args.batch_size,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "vocab": args.vocab_size,
            "hidden": args.hidden_size,
            "layers": args.num_layers,
            "logits_rows": args.batch_size * (length if full else args.response_len),
            "step_s": round(result["step_s"], 4),
            "step_cpu_s": round(result["step_cpu_s"], 4),
            "peak_mb": round(result["peak_mb"], 1),
            "memory": result["memory"],
        }
        rows.append(row)
        print(row, flush=True)
    path = results_stem(args.results_dir, "hf_step", device, args.tag).with_suffix(".csv")
    write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
