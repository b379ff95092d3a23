"""Several processes and memory: step time of 1 vs 2 processes, and the memory of the base weights.

Part 1 (``--part steps``) trains the tiny model on the synthetic dataset with ``python -m bear
train --no-eval``, once as one process and once under ``torchrun --nproc_per_node 2`` (DDP, gloo on
the CPU; the same global batch, so each rank does half the work), and reports seconds per optimiser
step from RUN/metrics.json's ``seconds_per_epoch``.

Part 2 (``--part memory``) builds a randomly initialised Llama of a realistic shape (default: width
2048, 16 layers, MLP 5632, 32 heads / 4 key-value heads, vocabulary 32000: about 0.84 B
parameters), adds LoRA (r 8 on q_proj, v_proj) and runs one forward/backward of a batch of
``--batch x --seq`` tokens, for each of fp32 / bf16 base weights x gradient checkpointing off / on.
Each case runs in a fresh process and reports its peak memory: the CUDA allocator's peak on a GPU,
the peak resident set size (``ru_maxrss``, including the Python and torch runtime) on the CPU.

    PYTHONPATH=. python benchmarks/distributed.py                       # both parts
    PYTHONPATH=. python benchmarks/distributed.py --part memory --layers 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import add_results_args, device_label, results_stem, timed, write_csv, write_json

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _step_seconds(workdir: Path, processes: int, args) -> float:
    """Seconds per optimiser step of a tiny ``bear train`` run on ``processes`` ranks."""
    out = workdir / f"run{processes}"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "--master_port", str(args.port)]  # fmt: skip
    cmd = [*launcher, "-m", "bear", "train", "--data", str(workdir / "synth"), "--out", str(out),
           "--loss", "bear", "--epochs", "1", "--limit-train", str(args.limit_train),
           "--batch-size", str(args.batch_size), "--no-eval", "--no-progress",
           "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads_per_process))
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    steps = -(-args.limit_train // args.batch_size)
    return metrics["seconds_per_epoch"] / steps


def _memory_case(args) -> dict:
    """One forward/backward of the random Llama with LoRA; runs in its own process."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bear.model import DTYPES

    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=32,
                         num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(DTYPES[args.dtype])  # built in its dtype: no fp32 copy in the peak
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)  # LoRA's adapters in fp32, as bear's
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 32000, (args.batch, args.seq), device=device)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, seconds = timed(step, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"dtype": args.dtype, "checkpointing": args.checkpointing, "params": params,
            "peak_gib": round(peak / GIB, 3), "step_seconds": round(seconds, 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("steps", "memory", "both"), default="both")
    p.add_argument("--limit-train", type=int, default=256, help="part 1: training rows")
    p.add_argument("--batch-size", type=int, default=32, help="part 1: global batch")
    p.add_argument("--threads-per-process", type=int, default=1, help="part 1: OMP threads")
    p.add_argument("--port", type=int, default=29541, help="part 1: torchrun's master port")
    p.add_argument("--hidden", type=int, default=2048, help="part 2: model width")
    p.add_argument("--mlp", type=int, default=5632, help="part 2: MLP width")
    p.add_argument("--layers", type=int, default=16, help="part 2: decoder blocks")
    p.add_argument("--batch", type=int, default=2, help="part 2: sequences")
    p.add_argument("--seq", type=int, default=256, help="part 2: tokens per sequence")
    p.add_argument("--device", default="cpu", help="part 2: cpu or cuda")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one memory case, print JSON
    add_results_args(p)
    args = p.parse_args()
    if args.case:
        args.dtype, checkpointing = args.case.split(",")
        args.checkpointing = checkpointing == "on"
        print(json.dumps(_memory_case(args)))
        return
    device = device_label(args.device if args.part == "memory" else "cpu")
    out = {"device": device, "steps": [], "memory": []}
    if args.part in ("steps", "both"):
        from bear.synth import SynthConfig, write_synth

        with tempfile.TemporaryDirectory() as tmp:
            write_synth(Path(tmp) / "synth", SynthConfig(seed=0))
            for processes in (1, 2):
                seconds = _step_seconds(Path(tmp), processes, args)
                out["steps"].append({"processes": processes, "step_seconds": round(seconds, 4)})
                print(out["steps"][-1], flush=True)
    if args.part in ("memory", "both"):
        for case in ("fp32,off", "fp32,on", "bf16,off", "bf16,on"):
            cmd = [sys.executable, __file__, "--case", case, *sys.argv[1:]]
            env = dict(os.environ, PYTHONPATH=str(REPO))
            done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            out["memory"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(out["memory"][-1], flush=True)
    out["shape"] = {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "batch", "seq")}
    stem = results_stem(args.results_dir, "distributed", device, args.tag)
    write_json(stem.with_suffix(".json"), out)
    rows = [{"part": "steps", **r} for r in out["steps"]] + [
        {"part": "memory", **r} for r in out["memory"]
    ]
    columns = ["part", "processes", "step_seconds", "dtype", "checkpointing", "params", "peak_gib"]
    write_csv(stem.with_suffix(".csv"), rows, columns)


if __name__ == "__main__":
    main()
