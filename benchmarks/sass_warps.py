"""Warps per row of the whole-row forward, compared on SASS (no GPU): instructions issued per row.

    python benchmarks/sass_warps.py [--arch 90] [--warps 8 2 1] [--out ...sass_warps_sm90.csv]

For each B in {10, 50}, masked or not, and each FORWARD_WARPS w (8 is today's default), the
ce_margin forward is compiled as the launcher launches it (bf16, V = 128256, chunks of 256·w
tokens: one 16-byte load per thread) and its forward loop read as in sass_report.py. A row's
issued warp-instructions are then estimated for random logits as

    w · [C · e · instr_per_elem + C · entry_per_chunk + T · entry_per_token]

with C = ceil(V / BLOCK_V) chunks, e = BLOCK_V / (32·w) elements per thread and chunk, and
T = B · (1 + ln(V / BLOCK_V)) tokens taken into the running top-B (the first chunk's B; after
it, in random order, the token at position i enters with probability B / i). Every chunk is
counted as entered, an upper bound for small chunks. This is an instruction count: latency (a
lone warp cannot hide its reductions' shuffles behind other warps of its row) shows only on a
GPU (`make gpu-bench`, impl triton_1warp).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import write_csv  # noqa: E402
from benchmarks._sass import VOCAB, Case, analyse_case  # noqa: E402

COLUMNS = ["beam_width", "masked", "warps", "block_v", "registers", "spill_bytes",
           "instr_per_elem", "entry_per_chunk", "entry_per_token",
           "row_warp_instructions"]  # fmt: skip


def estimate(warps: int, block_v: int, beam_width: int, loop: dict, vocab: int = VOCAB) -> int:
    """Issued warp-instructions per row (the module docstring's formula)."""
    chunks = math.ceil(vocab / block_v)
    per_thread = block_v / (32 * warps)
    entered = beam_width * (1 + math.log(vocab / block_v))
    total = chunks * per_thread * loop["instr_per_elem"] + chunks * loop["entry_per_chunk"]
    return round(warps * (total + entered * loop["entry_per_token"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability compiled for")
    p.add_argument("--warps", type=int, nargs="+", default=[8, 2, 1], help="FORWARD_WARPS values")
    p.add_argument("--out", default=None, help="default: results/sass_warps_sm{arch}.csv")
    args = p.parse_args()
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"sass_warps_sm{args.arch}.csv"
    )
    rows, seen = [], set()  # seen: the backward kernel, the same for every w, compiled once
    for beam_width in (10, 50):
        for masked in (False, True):
            for warps in args.warps:
                case = Case("bf16", masked, beam_width, fused=False, forward_warps=warps)
                block_v = 256 * warps  # the launcher's chunk for FORWARD_WARPS = warps
                (fwd,) = [
                    r for r in analyse_case(case, args.arch, seen=seen) if r["kernel"] == "fwd"
                ]
                loop = fwd["loops"]["forward"]
                row = {"beam_width": beam_width, "masked": masked, "warps": warps,
                       "block_v": block_v, "registers": fwd["registers"],
                       "spill_bytes": fwd["spill_bytes"]}  # fmt: skip
                row.update({k: loop[k] for k in COLUMNS[6:9]})
                row["row_warp_instructions"] = estimate(warps, block_v, beam_width, loop)
                rows.append(row)
                print(", ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
    write_csv(Path(out), rows, COLUMNS)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
