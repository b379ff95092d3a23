"""Per-loop SASS figures of the Triton kernels at sm_90, as the launcher launches them (no GPU).

    python benchmarks/sass_report.py [--arch 90] [--out benchmarks/results/sass_sm90.csv]

One row per (kernel, dtype, masked, beam_width, split, row_loop, forward_warps, loop): registers,
spill bytes of the kernel, then, for its forward or gradient loop, the instructions per logits
element and per thread (`instr_per_elem`, the loop body over BLOCK_V / threads; the rare top-B
entry, an inner loop, is left out), the cost of the top-B entry (`entry_per_chunk`: instructions of
the loop body off that cheapest path, paid once per chunk entered; `entry_per_token`: one iteration
of the inner loop, paid per token taken in), the 128-bit logits loads and the narrower ones
(`loads_scalar`). V = 128256.
The kernels are compiled without TRITON_INTERPRET (the variable is dropped here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import write_csv  # noqa: E402
from benchmarks._sass import VOCAB, Case, analyse_case  # noqa: E402

COLUMNS = [
    "kernel",
    "dtype",
    "masked",
    "beam_width",
    "split",
    "row_loop",
    "forward_warps",
    "registers",
]
COLUMNS += ["spill_bytes", "loop"]
COLUMNS += ["instr_per_elem", "entry_per_chunk", "entry_per_token", "loads_128", "loads_scalar"]


def cases():
    """bf16 at B = 10 and 50, with and without a mask, every path; fp16 at B = 10; split-V; the
    fused path's row loop (bear_kernels._triton.FUSED_PROGRAMS_PER_SM = 1).

    fp32 is left out: its loads carry the source line of a neighbouring statement in the line
    table, so they cannot be told from the mask's.
    """
    for dtype, beams in (("bf16", (10, 50)), ("fp16", (10,))):
        for beam_width in beams:
            for masked in (False, True):
                yield Case(dtype, masked, beam_width, fused=False)
                yield Case(dtype, masked, beam_width, fused=True)
                yield Case(dtype, masked, beam_width, fused=True, threshold_grad=True)
    for beam_width in (10, 50):  # split-V: one row on 132 SMs
        for masked in (False, True):
            yield Case("bf16", masked, beam_width, fused=False, split=True)
            yield Case("bf16", masked, beam_width, fused=True, threshold_grad=True, split=True)
    for beam_width in (10, 50):  # the fused path with one program per SM looping over rows
        for masked in (False, True):
            yield Case("bf16", masked, beam_width, fused=True, threshold_grad=True, row_loop=True)
    for beam_width in (10, 50):  # the whole-row forward run by one warp (FORWARD_WARPS = 1)
        for masked in (False, True):
            yield Case("bf16", masked, beam_width, fused=True, threshold_grad=True,
                       forward_warps=1)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=None, help="default: benchmarks/results/sass_sm{arch}.csv")
    args = p.parse_args()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"sass_sm{args.arch}.csv")
    seen, rows = set(), []
    for case in cases():
        for result in analyse_case(case, args.arch, VOCAB, seen):
            for loop, stats in result["loops"].items():
                rows.append({**result, **stats, "loop": loop})
    write_csv(Path(out), [{c: row[c] for c in COLUMNS} for row in rows])
    for row in rows:
        print(", ".join(str(row[c]) for c in COLUMNS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
