"""The quality benchmark records what it ran: its run folders' configs match its results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _helpers_train import tiny_synth

REPO = Path(__file__).resolve().parents[1]


def test_quality_smollm2_records_the_exact_budget_it_tested_with(tmp_path):
    """The run's config.json carries the --exact-budget the test split was counted with (it said
    null before: the budget went to the evaluation only), and so does the results file."""
    data = tiny_synth(tmp_path / "data")
    out, results = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "quality_smollm2.py", "--data", str(data), "--model", "tiny",
           "--losses", "sft", "--limit-train", "8", "--limit-eval", "3", "--max-history", "3",
           "--batch-size", "4", "--eval-batch-size", "4", "--exact-budget", "7",
           "--device", "cpu", "--out", str(out), "--results-dir", str(results)]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "data_sft_s0" / "config.json").read_text())
    assert config["exact_budget"] == 7
    (written,) = results.glob("quality_data_smollm2_*.json")
    assert json.loads(written.read_text())["results"]["sft"]["exact_budget"] == 7
