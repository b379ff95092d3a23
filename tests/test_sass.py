"""SASS gate: the machine code of every kernel the Triton path launches, read on a CPU machine.

benchmarks._sass compiles what bear_kernels._triton launches (bf16, V = 128256, its real
specialisation; one row on 132 SMs for the split-V launches) for sm_80, sm_90 and sm_100, in
one subprocess per architecture (the kernels must be compiled without TRITON_INTERPRET).
Selected with `-k sass`.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90, 100)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sass_rows():
    """{arch: [row per launched kernel]}, the three architectures compiled in parallel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "benchmarks._sass", "--arch", str(arch)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in ARCHS
    }
    rows = {}
    for arch, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            pytest.fail(f"benchmarks._sass --arch {arch} failed:\n{err[-3000:]}")
        rows[arch] = json.loads(out)
    return rows


def _loops(rows):
    for row in rows:
        for loop, stats in row["loops"].items():
            yield f"{row['kernel']} masked={row['masked']} {loop}", row, loop, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_every_kernel_compiles_without_spills(sass_rows, arch):
    kernels = {row["kernel"] for row in sass_rows[arch]}
    assert kernels == {"fwd", "fwd_grad", "fwd_grad_thr", "bwd", "scale"} | {
        "span",
        "merge",
        "merge_grad",
    }
    spills = {row["kernel"]: row["spill_bytes"] for row in sass_rows[arch] if row["spill_bytes"]}
    assert spills == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_three_programs_of_eight_warps_fit_an_sm(sass_rows, arch):
    # 65,536 registers per SM, allocated in steps of 8 per thread: 3 x 256 threads x 80 fit
    heavy = {row["kernel"]: row["registers"] for row in sass_rows[arch] if row["registers"] > 80}
    assert heavy == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_hot_loops_load_logits_128_bits_with_and_without_mask(sass_rows, arch):
    found = {
        (row["kernel"].removesuffix("_thr"), row["masked"], loop)
        for _, row, loop, _ in _loops(sass_rows[arch])
    }
    for kernel, loops in (("fwd", ["forward"]), ("fwd_grad", ["forward", "gradient"])):
        for loop in loops:
            assert {(kernel, False, loop), (kernel, True, loop)} <= found
    assert {("bwd", False, "gradient"), ("bwd", True, "gradient")} <= found
    assert {("span", False, "forward"), ("span", True, "forward")} <= found  # split-V
    narrow = {
        name: (stats["loads_128"], stats["loads_scalar"])
        for name, _, _, stats in _loops(sass_rows[arch])
        if stats["loads_128"] == 0 or stats["loads_scalar"] > 0
    }
    assert narrow == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_one_mask_word_load_per_thread_per_chunk(sass_rows, arch):
    # each thread loads each mask word it needs once (its 8 tokens share one word; the 4 threads
    # of a word load it in one broadcast load), not once per token; benchmarks/README.md says
    # why not one load per 32 tokens
    heavy = {
        name: stats["mask_loads_per_word"]
        for name, _, _, stats in _loops(sass_rows[arch])
        if stats["mask_loads_per_word"] > 1
    }
    assert heavy == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_sass_gradient_stores_are_128_bits(sass_rows, arch):
    narrow = {
        name: stats["stores_narrow"]
        for name, _, loop, stats in _loops(sass_rows[arch])
        if loop == "gradient" and (stats["stores_narrow"] or not stats["stores_128"])
    }
    assert narrow == {}
    (scale,) = [row["whole"] for row in sass_rows[arch] if row["kernel"] == "scale"]
    assert scale["stores_128"] > 0 and scale["stores_narrow"] == 0
