"""What every benchmark script shares: the device label, synchronised timing, the results writer.

Results go to ``benchmarks/results/<kind>_<device>[_<tag>].{csv,json,md}``, where ``<device>`` is
the slug of ``device_label``: the CUDA device's name, or the CPU's model name with torch's thread
count (``intel_r_xeon_r_processor_x2``). ``--results-dir`` sends them elsewhere (smoke runs).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; any other string as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_label(device: str | torch.device = "auto") -> str:
    """The machine a benchmark runs on: the CUDA device's name, or the CPU model with torch's
    thread count (CPU timings depend on it), e.g. "Intel(R) Xeon(R) Processor x2"."""
    device = resolve_device(str(device))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()}"


def slug(name: str) -> str:
    """Lower-case letters and digits joined by single underscores (at most 60 characters)."""
    out = "".join(c if c.isalnum() else " " for c in name.lower())
    return "_".join(out.split())[:60]


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: str | torch.device):
    """(fn(), seconds), synchronised before the clock starts and inside the timed call."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def add_results_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--tag`` (suffix of the file names) and ``--results-dir`` to a benchmark's parser."""
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--results-dir", default=str(RESULTS), help="folder for the results (default: results/)"
    )


def results_stem(results_dir: str | Path, kind: str, device: str, tag: str = "") -> Path:
    """``results_dir/<kind>[_<slug(device)>][_<tag>]`` (no suffix; ``device`` "" for results that
    depend on no machine); creates the folder."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "_".join(part for part in (kind, slug(device), tag) if part)


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """One CSV row per dict; columns default to the first row's keys."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON."""
    path.write_text(json.dumps(obj, indent=2))


def from_checkout(path: str | None, *names: str) -> list:
    """The objects ``names`` ("module:attribute", e.g. "bear.decoding:beam_search") of this
    checkout's ``bear`` (``path`` None), or of the checkout at ``path``, for a before/after run in
    one process: that checkout's ``bear`` modules are imported while its folder comes first on
    ``sys.path``, then taken out of ``sys.modules``, so that this checkout's stay as they were (the
    objects keep their own modules).

    Raises:
        ValueError: ``path`` holds no ``bear/__init__.py``, or a module came from elsewhere.
        ImportError / AttributeError: a name that checkout does not have.
    """
    pairs = [name.split(":") for name in names]
    if path is None:
        return [getattr(importlib.import_module(m), a) for m, a in pairs]
    root = Path(path).resolve()
    if not (root / "bear" / "__init__.py").is_file():
        raise ValueError(
            f"{path}: no bear/__init__.py there; give the root of another bear checkout (e.g. "
            "`git worktree add /tmp/base <commit>`, then /tmp/base)"
        )
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "bear"}
    sys.path.insert(0, str(root))
    try:
        modules = [importlib.import_module(m) for m, _ in pairs]
        for module in modules:
            if root not in Path(module.__file__).resolve().parents:
                raise ValueError(f"{path}: {module.__name__} came from {module.__file__}")
        return [getattr(module, a) for module, (_, a) in zip(modules, pairs, strict=True)]
    finally:
        sys.path.pop(0)
        for m in [m for m in sys.modules if m.split(".")[0] == "bear"]:
            del sys.modules[m]
        sys.modules.update(saved)
