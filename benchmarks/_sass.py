"""Machine code (SASS) of the Triton kernels as the launcher launches them, built on a CPU machine.

Triton's wheel ships ptxas, cuobjdump and nvdisasm, so a kernel compiles for sm_80 / sm_90 /
sm_100 without a GPU. The launches are not rebuilt by hand: the launcher functions of
bear_kernels._triton run on CPU tensors of the real shape while every kernel they name is swapped
for a recorder, and each recorded call is then specialised the way Triton's own launch path
specialises it (argument types, divisibility by 16, constexprs, num_warps) and compiled for the
target. The disassembly is cut into loops (natural loops of its control-flow graph); a top-level
loop that stores to global memory is the gradient loop, one that only loads is the forward loop.

Must run without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions), so
the test suite calls it in a subprocess:

    python -m benchmarks._sass --arch 90 [--dtype bf16] [--vocab 128256]    # JSON on stdout

Used by tests/test_sass.py (the gate) and benchmarks/sass_report.py (the CSV).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from bear_kernels import _triton as launcher
from bear_kernels._common import FusedParams, LossParams

ARCHS = (80, 90, 100)
VOCAB = 128256  # Llama 3
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# a logits load / a mask-word load, as written in the kernels' source (pointer, then offsets)
LOGITS_LOAD = re.compile(r"tl\.load\(\s*row_z\b")
MASK_LOAD = re.compile(r"tl\.load\(\s*row_m\b")


@dataclasses.dataclass(frozen=True)
class Case:
    """One public use of the Triton path: which launches it makes depends on these."""

    dtype: str  # logits dtype: bf16, fp16, fp32
    masked: bool  # an allowed_mask is given
    beam_width: int  # B
    fused: bool  # bear_loss with a reduction (gradient from the forward) or ce_margin
    threshold_grad: bool = False
    split: bool = False  # few rows on an H100 (SPLIT_SMS SMs): split-V
    row_loop: bool = False  # FUSED_PROGRAMS_PER_SM = 1 on SPLIT_SMS SMs with 2·SPLIT_SMS rows
    forward_warps: int | None = None  # FORWARD_WARPS: warps of the whole-row forward


SPLIT_SMS = 132  # H100 SXM


# --------------------------------------------------------------------------------------------
# recording and compiling the launches
# --------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records instead of running."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def _recording(calls):
    kernels = {k: v for k, v in vars(launcher).items() if isinstance(v, JITFunction)}
    try:
        for name, kernel in kernels.items():
            setattr(launcher, name, _Recorder(kernel, calls))
        yield
    finally:
        for name, kernel in kernels.items():
            setattr(launcher, name, kernel)


@contextlib.contextmanager
def _sm_count(count):
    previous = launcher.SM_COUNT_CPU
    launcher.SM_COUNT_CPU = count
    try:
        yield
    finally:
        launcher.SM_COUNT_CPU = previous


@contextlib.contextmanager
def _programs_per_sm(k):
    previous = launcher.FUSED_PROGRAMS_PER_SM
    launcher.FUSED_PROGRAMS_PER_SM = k
    try:
        yield
    finally:
        launcher.FUSED_PROGRAMS_PER_SM = previous


@contextlib.contextmanager
def _forward_warps(w):
    previous = launcher.FORWARD_WARPS
    launcher.FORWARD_WARPS = w
    try:
        yield
    finally:
        launcher.FORWARD_WARPS = previous


def record_launches(case: Case, vocab: int = VOCAB, n_rows: int = 1):
    """[(JITFunction, grid, args, kwargs)] that the launcher makes for one forward + backward.

    The CPU tensors stand for a device with SPLIT_SMS SMs when case.split, else with none
    (no split whatever n_rows).
    """
    if case.row_loop:  # more rows than split-V's threshold, one program per SM
        n_rows = max(n_rows, launcher.SPLIT_ROWS_PER_SM * SPLIT_SMS)
    z = torch.zeros(n_rows, vocab, dtype=DTYPES[case.dtype], requires_grad=True)
    y = torch.zeros(n_rows, dtype=torch.int64)
    mask = torch.zeros(n_rows, -(-vocab // 32), dtype=torch.int32) if case.masked else None
    params = LossParams(case.beam_width, 1.0, -100, case.threshold_grad)
    calls = []
    sms = SPLIT_SMS if case.split or case.row_loop else 0
    with (
        _recording(calls),
        _sm_count(sms),
        _programs_per_sm(1 if case.row_loop else None),
        _forward_warps(case.forward_warps),
    ):
        if case.fused:
            loss = launcher.bear_loss_triton_fused(z, y, mask, params, FusedParams(1.0, 1.0, "sum"))
            loss.backward(torch.tensor(2.0))  # g != 1: the scale kernel
        else:
            ce, margin, _ = launcher.ce_margin_triton(z, y, mask, params)
            (ce.sum() + margin.sum()).backward()
    return calls


def compile_launch(kernel, args, kwargs, arch):
    """The CompiledKernel that Triton's launch path would build for these arguments on sm_arch.

    Compiled in a fresh cache: a cached cubin of the same source keeps the line numbers of the
    file it was first compiled from, and loads are told apart by their source line.
    """
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            return _compile(kernel, args, kwargs, arch)
        finally:
            if previous is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def _compile(kernel, args, kwargs, arch):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


# --------------------------------------------------------------------------------------------
# reading the SASS
# --------------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"(\.L_x_\d+)")


@dataclasses.dataclass
class Instr:
    addr: int
    text: str
    file: str | None
    line: int | None

    @property
    def op(self):
        words = re.sub(r"^@!?U?P[T0-9]+\s+", "", self.text).split()
        return words[0] if words else ""


def _tool(name, cubin, *flags):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [os.path.join(BIN, name), *flags, f.name], capture_output=True, text=True, check=True
        ).stdout


def disassemble(cubin):
    """([Instr], {label: address}) with the source line of each instruction (-lineinfo)."""
    instrs, labels, pending, where = [], {}, [], (None, None)
    for raw in _tool("nvdisasm", cubin, "-c", "-g").splitlines():
        if m := _LINE.search(raw):
            where = (m.group(1), int(m.group(2)))
        elif m := _LABEL.match(raw):
            pending.append(m.group(1))
        elif m := _INSTR.search(raw):
            addr = int(m.group(1), 16)
            labels.update({label: addr for label in pending})
            pending = []
            instrs.append(Instr(addr, m.group(2), *where))
    return instrs, labels


def _is_branch(op):
    # BRA.DIV is the fallback of a warp shuffle for diverged warps: dead in Triton's reductions
    return op.startswith("BRA") and not op.startswith("BRA.DIV")


def _may_fall_through(text):
    ops = text.split(None, 1)
    return text.startswith("@") or (len(ops) > 1 and re.match(r"!?U?P[T0-9]+\s*,", ops[1]))


def _blocks(instrs, labels):
    """Basic blocks {start: [addresses]} and successors {start: {starts}}, reachable only."""
    addrs = [i.addr for i in instrs]
    leaders = {addrs[0]}
    for k, ins in enumerate(instrs[:-1]):
        if _is_branch(ins.op) or ins.op.startswith(("EXIT", "RET")):
            leaders.add(addrs[k + 1])
            if (m := _TARGET.search(ins.text)) and m.group(1) in labels:
                leaders.add(labels[m.group(1)])
    starts = sorted(leaders)
    blocks, succ = {}, {}
    for j, start in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else addrs[-1] + 1
        blocks[start] = [a for a in addrs if start <= a < end]
        last = instrs[addrs.index(blocks[start][-1])]
        nxt = {starts[j + 1]} if j + 1 < len(starts) else set()
        if _is_branch(last.op):
            m = _TARGET.search(last.text)
            succ[start] = ({labels[m.group(1)]} if m and m.group(1) in labels else set()) | (
                nxt if _may_fall_through(last.text) else set()
            )
        elif last.op.startswith(("EXIT", "RET")):
            succ[start] = nxt if _may_fall_through(last.text) else set()
        else:
            succ[start] = nxt
    seen, todo = set(), [starts[0]]
    while todo:
        b = todo.pop()
        if b not in seen:
            seen.add(b)
            todo.extend(succ[b])
    return {b: blocks[b] for b in seen}, {b: succ[b] & seen for b in seen}


def natural_loops(instrs, labels):
    """[(header, {block start: [addresses]}, successors)] of each natural loop (back edge u -> h,
    h dominating u); successors are those of the whole program."""
    blocks, succ = _blocks(instrs, labels)
    order = sorted(blocks)
    pred = {b: {p for p in order if b in succ[p]} for b in order}
    dom = {b: set(order) for b in order}
    dom[order[0]] = {order[0]}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            new = set.intersection(*(dom[p] for p in pred[b])) | {b} if pred[b] else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    bodies = {}
    for u in order:
        for h in succ[u] & dom[u]:
            nodes, todo = {h, u}, [u] if u != h else []
            while todo:
                for p in pred[todo.pop()] - nodes:
                    nodes.add(p)
                    todo.append(p)
            bodies.setdefault(h, set()).update(nodes)
    return [(h, {b: blocks[b] for b in body}, succ) for h, body in sorted(bodies.items())]


def shortest_iteration(header, blocks, succ, instrs_by_addr):
    """Instructions on the cheapest path from the loop header back to it, through `blocks`.

    The iteration that takes no rare branch (the top-B entry skipped): what a chunk costs when
    nothing enters the running top-B.
    """

    def cost(b):
        return sum(instrs_by_addr[a].op != "NOP" for a in blocks[b])

    best, heap = {}, [(cost(header), header)]
    while heap:
        d, b = heapq.heappop(heap)
        if b in best:
            continue
        best[b] = d
        for nxt in succ[b]:
            if nxt == header:
                return d
            if nxt in blocks and nxt not in best:
                heapq.heappush(heap, (d + cost(nxt), nxt))
    return None


def _load_lines(kernel):
    """{(file, line): 'logits' | 'mask'} of the tl.load calls in the kernel's modules.

    Its own module and bear_kernels._kernels, whose helpers every kernel inlines.
    """
    kinds = {}
    for module in {sys.modules[kernel.fn.__module__], sys.modules["bear_kernels._kernels"]}:
        path = inspect.getsourcefile(module)
        text = open(path).read()
        for m in re.finditer(r"tl\.load\(", text):
            line = text.count("\n", 0, m.start()) + 1
            head = text[m.start() : m.start() + 80]
            if LOGITS_LOAD.match(head):
                kinds[(path, line)] = "logits"
            elif MASK_LOAD.match(head):
                kinds[(path, line)] = "mask"
    return kinds


def _width(op):
    for bits in ("128", "64"):
        if f".{bits}" in op:
            return int(bits)
    return 16 if any(s in op for s in (".U16", ".S16")) else 8 if ".U8" in op else 32


def loop_stats(instrs, body, load_kinds, elems_per_thread):
    """Counts over one loop body (its inner loops excluded by the caller)."""
    stats = {"instructions": 0, "loads_128": 0, "loads_scalar": 0, "mask_loads": 0}
    stats |= {"stores_128": 0, "stores_narrow": 0, "global_stores": 0}
    for ins in instrs:
        if ins.addr not in body or ins.op == "NOP":
            continue
        stats["instructions"] += 1
        if ins.op.startswith(("LDG", "LDGSTS")) and not ins.op.startswith("LDGDEPBAR"):
            kind = load_kinds.get((ins.file, ins.line))
            if kind == "logits":
                stats["loads_128" if _width(ins.op) == 128 else "loads_scalar"] += 1
            elif kind == "mask":
                stats["mask_loads"] += 1
        elif ins.op.startswith("STG"):
            stats["global_stores"] += 1
            stats["stores_128" if _width(ins.op) == 128 else "stores_narrow"] += 1
    stats["instr_per_elem"] = round(stats["instructions"] / elems_per_thread, 2)
    # loads of one mask word per thread: a word's 32 tokens are spread over a few threads, each
    # of which loads it (one broadcast load); the word-per-token code loads it once per token
    stats["mask_loads_per_word"] = round(stats["mask_loads"] / max(1, elems_per_thread / 32), 3)
    return stats


def analyse(compiled, kernel, block_v, num_warps):
    """Registers, spills and the forward / gradient loops of one compiled kernel."""
    usage = _tool("cuobjdump", compiled.asm["cubin"], "--dump-resource-usage")

    def field(key):
        return int(re.search(rf"{key}:(\d+)", usage).group(1))

    instrs, labels = disassemble(compiled.asm["cubin"])
    spills = field("STACK") + field("LOCAL")
    spills += 4 * sum(ins.op.startswith(("LDL", "STL")) for ins in instrs)
    kinds = _load_lines(kernel)
    elems = block_v / (32 * num_warps)
    whole = loop_stats(instrs, {ins.addr for ins in instrs}, kinds, elems)
    result = {"registers": field("REG"), "spill_bytes": spills, "whole": whole, "loops": {}}
    loops = natural_loops(instrs, labels)
    by_addr = {ins.addr: ins for ins in instrs}

    def own(blocks):  # the loop's blocks outside the loops nested in it
        inner = set().union(*(o.keys() for _, o, _ in loops if o.keys() < blocks.keys()))
        return {b: addrs for b, addrs in blocks.items() if b not in inner}

    def touches_memory(blocks):  # logits loads or global stores in the loop's own blocks
        st = loop_stats(instrs, {a for addrs in own(blocks).values() for a in addrs}, kinds, 1)
        return st["loads_128"] + st["loads_scalar"] + st["global_stores"] > 0

    chunk_loops = []  # loops over a row's chunks: they touch memory, and no loop inside does
    for header, blocks, succ in loops:
        inside = [o for _, o, _ in loops if o.keys() < blocks.keys()]
        if touches_memory(blocks) and not any(touches_memory(o) for o in inside):
            chunk_loops.append((header, blocks, succ))
    for header, blocks, succ in chunk_loops:  # the inner loops left are the top-B entry
        outer = own(blocks)
        stats = loop_stats(instrs, {a for addrs in outer.values() for a in addrs}, kinds, elems)
        hot = shortest_iteration(header, outer, succ, by_addr)
        stats["hot_instructions"] = hot
        stats["instr_per_elem"] = round(hot / elems, 2)
        # the top-B entry: per token taken in (an iteration of the inner loop), and per chunk
        # entered (the loop body's instructions off the hot path, the inner loop left out)
        entries = [
            shortest_iteration(h, o, succ, by_addr) for h, o, _ in loops if o.keys() < blocks.keys()
        ]
        stats["entry_per_token"] = max(entries, default=0)
        stats["entry_per_chunk"] = stats["instructions"] - hot if entries else 0
        result["loops"]["gradient" if stats["global_stores"] else "forward"] = stats
    return result


def analyse_case(case: Case, arch: int, vocab: int = VOCAB, seen=None):
    """[{kernel, case fields, registers, spill_bytes, loops}] for each launch of the case.

    `seen`, a set shared between calls, skips a launch whose specialisation was already analysed.
    """
    rows = []
    for kernel, _, args, kwargs in record_launches(case, vocab):
        key = (kernel_label(kernel, kwargs), _specialisation(kernel, args, kwargs))
        if seen is not None:
            if key in seen:
                continue
            seen.add(key)
        compiled = compile_launch(kernel, args, kwargs, arch)
        result = analyse(compiled, kernel, _tile_elements(kwargs), kwargs.get("num_warps", 4))
        rows.append({"kernel": key[0], "arch": arch, **dataclasses.asdict(case), **result})
    return rows


def _tile_elements(kwargs):
    """Elements of the kernel's main tile: BLOCK_V (chunk), BLOCK (scale), spans x slots (merge)."""
    if "BLOCK_V" in kwargs:
        return kwargs["BLOCK_V"]
    return kwargs.get("BLOCK", kwargs.get("SPAN_PAD", 1) * kwargs.get("BEAM_PAD", 1))


def _specialisation(kernel, args, kwargs):
    """What Triton keys its compiled kernels on: argument types, divisibility, constexprs."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, options = binder(*args, **kwargs)
    return str((specialization, options))


def kernel_label(kernel, kwargs):
    """fwd, fwd_grad (the fused forward), fwd_grad_thr (with threshold_grad), bwd, scale, span,
    merge, merge_grad ..."""
    name = kernel.fn.__name__.strip("_").removesuffix("_kernel").removeprefix("bear_")
    if kwargs.get("FUSED_GRAD"):
        name += "_grad_thr" if kwargs.get("THRESHOLD_GRAD") else "_grad"
    return name


# The fewest uses that launch every kernel the Triton path has, with and without a mask.
GATE_CASES = (
    Case("bf16", False, 10, fused=True),
    Case("bf16", True, 10, fused=True),  # msl / bear training: the path that runs most
    Case("bf16", True, 50, fused=True, threshold_grad=True),
    Case("bf16", False, 10, fused=False),
    Case("bf16", True, 10, fused=False),
    Case("bf16", True, 10, fused=True, split=True),
    Case("bf16", False, 50, fused=False, split=True),
    Case("bf16", True, 50, fused=True, threshold_grad=True, forward_warps=1),  # opt-in variant
    Case("bf16", True, 10, fused=True, threshold_grad=True, row_loop=True),  # opt-in variant
)


def main():
    p = argparse.ArgumentParser(description="SASS of the launched kernels, as JSON")
    p.add_argument("--arch", type=int, default=90, choices=ARCHS)
    p.add_argument("--vocab", type=int, default=VOCAB)
    args = p.parse_args()
    seen = set()
    rows = [row for case in GATE_CASES for row in analyse_case(case, args.arch, args.vocab, seen)]
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    main()
