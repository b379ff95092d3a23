"""Speed and peak memory of the BEAR loss beside plain cross-entropy; writes one CSV row per case.

    python benchmarks/kernel_speed.py                       # the default grid on this machine
    python benchmarks/kernel_speed.py --n-rows 256 --vocab 4096 --beam-width 10 --dtype fp32

Impls: `torch` and `triton` (bear_loss with that impl), `triton_1sm` (triton with the fused path's
grid bounded to one program per SM, each looping over rows: fewer rows in flight, so the gradient
pass may re-read its row from L2), `triton_1warp` (triton with the whole-row forward run by one
warp per row, chunks of 256: `FORWARD_WARPS`; both variants only where the launcher reads their
setting, not on split-V shapes), `torch_ce` (F.cross_entropy: the plain SFT
cost), `torch_compile` (torch.compile of bear_loss_reference; CUDA only), `liger_ce` (Liger-Kernel's
cross entropy; only when `liger_kernel` imports and CUDA is used). `triton` runs on CUDA only here
(the interpreter is a test tool, not a benchmark). Modes: `fwd`, `bwd` (backward alone, after an
untimed forward), `fwd_bwd`. The impls of a case take turns call by call (interleaved, so a change
in the machine's load falls on all alike). On CUDA each timed call runs between two CUDA events
after an L2 flush; on the CPU it is wall time; warm-up and compilation are not timed. `floor_ms`
is the memory floor of the mode at the copy bandwidth measured in the same run (N·V·itemsize read
for fwd; that plus N·V·itemsize written for bwd and fwd_bwd); `gbps` is those bytes over the
measured median. `peak_mem_mb` is the peak memory one call adds above the inputs (the gradient
included): on CUDA the allocator's peak; on the CPU the peak resident set of a child process that
runs the case alone with glibc returning every block of 64 KiB or more when freed (NaN without
Linux's /proc); `peak_over_logits` is it over the logits' size. `note` says "out of memory"
for a case that ran out of GPU memory (its figures NaN; the next case runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    add_results_args,
    device_label,
    resolve_device,
    results_stem,
    sync,
    timed,
    write_csv,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bear_kernels import _triton as launcher  # noqa: E402
from bear_kernels import bear_loss, bear_loss_reference, pack_allowed_mask  # noqa: E402

COLUMNS = [
    "device",
    "impl",
    "dtype",
    "n_rows",
    "vocab",
    "beam_width",
    "masked_fraction",
    "mode",
    "ms_median",
    "gbps",
    "floor_ms",
    "peak_mem_mb",
    "peak_over_logits",
    "note",
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("torch", "triton", "triton_1sm", "triton_1warp", "torch_ce", "torch_compile", "liger_ce")
MODES = ("fwd", "bwd", "fwd_bwd")


# Bytes read before each timed call on CUDA so that the call starts with an L2 (50-60 MB on an
# H100 / H200) holding none of its data: a small case's logits (N = 256, V = 32000: 16 MB) would
# otherwise be re-read from L2 and beat the memory floor. A read leaves clean lines (a write would
# leave dirty ones, written back during the timed call).
L2_FLUSH_BYTES = 256 << 20


@functools.cache
def _l2_flush_buffer(device):
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def _time_ms(fn, device, repeats, warmup, setup=None):
    """Median time of fn() in ms; setup() runs untimed before each call.

    CUDA: each call between two CUDA events after an L2 flush (the events take in the host's
    launch time wherever the GPU waits for it); CPU: wall time.
    """
    for _ in range(warmup):
        arg = setup() if setup else None
        fn(arg)
    times = []
    for _ in range(repeats):
        arg = setup() if setup else None
        if device.type != "cuda":
            times.append(timed(lambda arg=arg: fn(arg), device)[1] * 1e3)
            continue
        _l2_flush_buffer(device).sum()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn(arg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# Elements of the bandwidth probe: 2^26 (128-256 MiB) is far beyond any cache, whatever the case's
# size (a probe the size of a small case would run in L2 and put the floor too low).
COPY_ELEMENTS = 1 << 26


def copy_gbps(dtype, device, repeats):
    """Measured copy bandwidth (GB/s): read + write bytes of a 2^26-element copy_ in dtype."""
    src = torch.empty(COPY_ELEMENTS, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda _: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# Graphs torch.compile may keep for bear_loss_reference. Its default (8) is about what a grid's
# shapes, beam widths and mask/no-mask need; past it, dynamo runs the function eagerly without a
# word, which would time eager code as `torch_compile`. With this limit it compiles every case, and
# a case past it raises instead (fail_on_recompile_limit_hit, where torch has it).
COMPILE_LIMIT = 256


@functools.cache
def compiled_reference():
    """One torch.compile of bear_loss_reference for the whole run (its graphs are reused across
    cases); a case that would fall back to eager raises."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = COMPILE_LIMIT
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True
    return torch.compile(bear_loss_reference)


def make_loss_fn(impl, beam_width, mask, device, shape):
    """A function (logits, target) -> scalar loss for one impl, or None if unavailable here (or,
    for a triton variant, where the launcher would not use the setting: split-V shapes)."""
    if impl in ("torch", "triton"):
        if impl == "triton" and device.type != "cuda":
            return None
        return lambda z, y: bear_loss(
            z, y, beam_width=beam_width, allowed_mask=mask, impl=impl, validate_target=False
        )
    variants = {"triton_1sm": ("FUSED_PROGRAMS_PER_SM", 1), "triton_1warp": ("FORWARD_WARPS", 1)}
    if impl in variants:  # triton with one launcher setting changed for the call
        if device.type != "cuda":
            return None
        n_rows, vocab = shape
        if launcher._span(n_rows, vocab, launcher._block_v(vocab), device) < vocab:
            return None  # split-V: neither setting is read, the row would be `triton`'s
        name, value = variants[impl]

        def variant(z, y):
            setattr(launcher, name, value)
            try:
                return bear_loss(z, y, beam_width=beam_width, allowed_mask=mask, impl="triton",
                                 validate_target=False)  # fmt: skip
            finally:
                setattr(launcher, name, None)

        return variant
    if impl == "torch_ce":
        return lambda z, y: F.cross_entropy(z, y)  # plain SFT cost: no mask, no top-B
    if impl == "torch_compile":
        if device.type != "cuda":
            return None
        compiled = compiled_reference()
        return lambda z, y: compiled(
            z, y, beam_width=beam_width, allowed_mask=mask, validate_target=False
        )
    if impl == "liger_ce":
        if device.type != "cuda":
            return None
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            return None
        liger = LigerCrossEntropyLoss()
        return lambda z, y: liger(z, y)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def make_inputs(n_rows, vocab, dtype, masked_fraction, device, seed=0):
    """Logits (N, V), targets (N,), and a bitmask with that fraction of tokens masked (or None).

    Drawn on ``device`` by its own generator: on the host, the largest cases' (N, V) draws took
    16 s (no mask) and 41 s (masked) each on this project's 2-core CPU, per case.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    z = (torch.randn(n_rows, vocab, generator=g, device=device) * 2).to(dtype)  # (N, V)
    y = torch.randint(0, vocab, (n_rows,), generator=g, device=device)  # (N,)
    mask = None
    if masked_fraction > 0:
        allowed = torch.rand(n_rows, vocab, generator=g, device=device) >= masked_fraction
        allowed[torch.arange(n_rows, device=device), y] = True  # (N, V)
        allowed[:, 0] = True  # at least 2 allowed tokens per row
        allowed[:, 1] = True
        mask = pack_allowed_mask(allowed)
    return z, y, mask


def prepare_case(impl, mode, z, y, beam_width, mask, device):
    """(timed, setup) of one impl and mode: setup() runs untimed before each timed(arg) call; None
    if the impl is unavailable here."""
    fn = make_loss_fn(impl, beam_width, mask, device, z.shape)
    if fn is None:
        return None
    # its own copy of the logits: liger_ce writes its gradient into its input in the forward, which
    # would otherwise hand the impls after it gradients for logits
    leaf = z.detach().clone().requires_grad_(True)

    def forward(_):
        return fn(leaf, y)

    def backward(loss):
        loss.backward()
        leaf.grad = None

    def forward_backward(_):
        fn(leaf, y).backward()
        leaf.grad = None

    if mode == "fwd":
        return forward, None
    if mode == "bwd":
        return backward, lambda: fn(leaf, y)
    return forward_backward, None


def time_interleaved(cases: dict, device, repeats, warmup) -> dict:
    """impl -> median ms of its timed calls, the impls taking turns call by call (so a change in
    the machine's load falls on all of them alike); warm-up calls first, untimed."""
    for _ in range(warmup):
        for timed_fn, setup in cases.values():
            timed_fn(setup() if setup else None)
    times = {impl: [] for impl in cases}
    for _ in range(repeats):
        for impl, (timed_fn, setup) in cases.items():
            times[impl].append(_time_ms(timed_fn, device, 1, 0, setup))
    return {impl: statistics.median(t) for impl, t in times.items()}


def cuda_peak_mb(timed_fn, setup, mode, device) -> float:
    """Peak CUDA allocation (MiB) above what was allocated before one call (for bwd: after its
    forward)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    arg = setup() if setup else None
    if mode == "bwd":  # the forward's own allocations are not the backward's
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    timed_fn(arg)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# A child process measures the CPU peak: glibc then maps every block of 64 KiB or more on its own
# and unmaps it when freed, so the resident set follows the live tensors, and the kernel's peak
# resident set (VmHWM, reset through /proc/self/clear_refs) is the call's peak.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_cpu_peak(case: dict) -> float:
    """In the probe process: the peak resident memory (MiB) one call of the case adds (the
    gradient included), after one untimed call (lazily built tables)."""
    z, y, mask = make_inputs(case["n"], case["v"], DTYPES[case["dtype"]], case["frac"],
                             torch.device("cpu"))  # fmt: skip
    timed_fn, setup = prepare_case(case["impl"], case["mode"], z, y, case["b"], mask,
                                   torch.device("cpu"))  # fmt: skip
    timed_fn(setup() if setup else None)
    arg = setup() if setup else None
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    timed_fn(arg)
    return (_rss_kib("VmHWM") - base) / 1024


def cpu_peak_mb(case: dict, threads: int | None) -> float:
    """The case's CPU peak (MiB) measured in a child process (NaN where /proc is missing)."""
    if not Path("/proc/self/clear_refs").exists():
        return float("nan")
    cmd = [sys.executable, __file__, "--probe-memory", json.dumps(case)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, **PROBE_ENV}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def floor_bytes(mode, n_rows, vocab, itemsize):
    """Bytes of the memory floor: read the logits once; bwd and fwd_bwd also write the grad."""
    one = n_rows * vocab * itemsize
    return one if mode == "fwd" else 2 * one


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-rows", type=int, nargs="+", default=[2048, 8192], help="N values")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="V values")
    p.add_argument("--beam-width", type=int, nargs="+", default=[10, 50], help="B values")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument(
        "--masked-fraction",
        type=float,
        nargs="+",
        default=[0.0],
        help="fraction of tokens outside the allowed set (0: no mask is passed)",
    )
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--device-name", default=None, help="name in the CSV and file (default: the device's)"
    )
    p.add_argument("--repeats", type=int, default=10, help="timed calls per case (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which no new shape is started (the first always runs, the one running "
        "finishes; the CSV, rewritten after every impl, keeps what was measured and the run "
        "lists what it skipped)",
    )
    p.add_argument(
        "--probe-memory",
        metavar="CASE_JSON",
        help="internal: measure one case's CPU peak in this process and print it (MiB)",
    )
    add_results_args(p)
    args = p.parse_args(argv)
    if args.probe_memory:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(probe_cpu_peak(json.loads(args.probe_memory)))
        return

    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":  # the timing events record on the current device
        torch.cuda.set_device(device)
    name = args.device_name or device_label(device)
    out = results_stem(args.results_dir, "kernel", name, args.tag).with_suffix(".csv")
    print(f"device={name} torch={torch.__version__} -> {out}")

    grid = [
        (n, v, b, d, f)
        for d in args.dtype
        for n in args.n_rows
        for v in args.vocab
        for b in args.beam_width
        for f in args.masked_fraction
    ]
    rows, start, skipped = [], time.perf_counter(), []
    bar = tqdm(total=len(grid) * len(args.impls) * len(args.modes), unit="case")
    for n, v, b, dname, frac in grid:
        over = args.time_budget is not None and time.perf_counter() - start > args.time_budget
        if over and (n, v, b, dname, frac) != grid[0]:  # the first shape always runs
            skipped.append(f"{dname} N={n} V={v} B={b} masked={frac}")
            continue
        dtype = DTYPES[dname]
        z, y, mask = make_inputs(n, v, dtype, frac, device)
        gbps_copy = copy_gbps(dtype, device, args.repeats)
        for mode in args.modes:
            bar.set_description(f"{dname} N={n} V={v} B={b} {mode}")
            cases = {}
            for impl in args.impls:
                case = prepare_case(impl, mode, z, y, b, mask, device)
                if case is not None:
                    cases[impl] = case
            note = ""
            try:
                ms = time_interleaved(cases, device, args.repeats, args.warmup)
            except torch.cuda.OutOfMemoryError:  # rows that say so; the next case runs
                ms, note = dict.fromkeys(cases, float("nan")), "out of memory"
                torch.cuda.empty_cache()
            if device.type == "cuda":
                peaks = {
                    impl: float("nan") if note else cuda_peak_mb(timed_fn, setup, mode, device)
                    for impl, (timed_fn, setup) in cases.items()
                }
            del cases  # the CPU probes run beside this process: its copies are freed first
            if device.type != "cuda":
                peaks = {
                    impl: cpu_peak_mb(
                        dict(impl=impl, mode=mode, n=n, v=v, b=b, dtype=dname, frac=frac),
                        args.threads,
                    )
                    for impl in ms
                }
            for impl, peak in peaks.items():
                nbytes = floor_bytes(mode, n, v, z.element_size())
                logits_mb = n * v * z.element_size() / 2**20
                rows.append(
                    {
                        "device": name,
                        "impl": impl,
                        "dtype": dname,
                        "n_rows": n,
                        "vocab": v,
                        "beam_width": b,
                        "masked_fraction": frac,
                        "mode": mode,
                        "ms_median": round(ms[impl], 4),
                        "gbps": round(nbytes / (ms[impl] * 1e-3) / 1e9, 2),
                        "floor_ms": round(nbytes / (gbps_copy * 1e9) * 1e3, 4),
                        "peak_mem_mb": round(peak, 2) if math.isfinite(peak) else "nan",
                        "peak_over_logits": round(peak / logits_mb, 3)
                        if math.isfinite(peak)
                        else "nan",
                        "note": note,
                    }
                )
            bar.update(len(args.impls))
            write_csv(out, rows, COLUMNS)  # after every mode: a run cut short keeps its rows
        del z, y, mask
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    print(f"wrote {len(rows)} rows to {out}")
    if skipped:
        print(f"--time-budget {args.time_budget:g} s: {len(skipped)} shapes not started: "
              + "; ".join(skipped))  # fmt: skip


if __name__ == "__main__":
    main()
