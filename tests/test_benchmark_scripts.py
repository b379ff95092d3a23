"""The quality benchmark records what it ran: its run folders' configs match its results file."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_train import SHARED_DATA, tiny_synth

from bear.data import filter_catalogue, load_dataset

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


def _gpu_bench(results: Path, python: str, **env) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python, **env}
    cmd = ["sh", "benchmarks/gpu_bench.sh", str(results)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def test_gpu_bench_compiles_the_kernels_and_goes_on_after_a_failed_step(tmp_path):
    """Each step of `make gpu-bench` runs with TRITON_INTERPRET=0 (tests/conftest.py turns the
    interpreter on where the variable is unset, so the parity step tested the interpreter, for
    hours, instead of the compiled kernels), writes into the results folder given, and a failed
    step neither stops the next ones nor goes unreported. A stand-in python records the calls."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1 $2" in "-m pip") exit 0;; esac\n'  # .whl/ installs
                    'echo "TRITON_INTERPRET=${TRITON_INTERPRET-unset} $*" >> "$CALLS"\n'
                    'case "$*" in *decoding_speed*) exit 3;; esac\n')  # fmt: skip
    fake.chmod(0o755)
    results = tmp_path / "results"
    done = _gpu_bench(results, str(fake), CALLS=str(calls))
    assert done.returncode == 1
    assert "failed: decoding" in done.stdout
    lines = calls.read_text().splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["-m", "pytest"], ["benchmarks/kernel_speed.py", "--device"],
        ["benchmarks/kernel_speed.py", "--device"], ["benchmarks/decoding_speed.py", "--device"],
        ["benchmarks/train_time.py", "--device"],
    ]  # fmt: skip
    assert "--tag reference" in lines[2] and "--tag" not in lines[1]
    assert all(line.startswith("TRITON_INTERPRET=0 ") for line in lines), lines
    assert all(f"--results-dir {results}" in line for line in lines[1:]), lines
    assert "== decoding: exit 3" in (results / "gpu_bench.log").read_text()


def test_gpu_bench_runs_every_step_at_toy_size_on_the_cpu(tmp_path):
    """GPU_BENCH_SMOKE=1 runs the whole script on the CPU at toy sizes: the flags it passes exist
    and every result file lands in the folder given (7 files, within the 8 a device run returns)."""
    results = tmp_path / "results"
    done = _gpu_bench(results, sys.executable, GPU_BENCH_SMOKE="1",
                      BEAR_DATA=str(SHARED_DATA))  # fmt: skip
    assert done.returncode == 0, (results / "gpu_bench.log").read_text()[-3000:]
    files = ["gpu_bench.log", "kernel_*[0-9].csv", "kernel_*_reference.csv", "decoding_*.csv",
             "decoding_*.json", "train_time_*.csv", "train_time_*.json"]  # fmt: skip
    assert len(list(results.iterdir())) == len(files)
    for pattern in files:
        assert len(list(results.glob(pattern))) == 1, pattern


def test_the_study_resumes_without_repeating_finished_work(tmp_path):
    """study_smollm2.py at toy size (tiny model): every run, evaluation and the results file;
    started again, it trains and evaluates nothing (each step found done) and says nothing is
    missing."""
    data = tiny_synth(tmp_path / "data")
    cmd = [sys.executable, "study_smollm2.py", "--data", str(data), "--model", "tiny",
           "--out", str(tmp_path / "runs"), "--limit-train", "24", "--limit-eval", "4",
           "--eval-every", "2", "--valid-rows", "4", "--epochs", "1", "--batch-size", "8",
           "--eval-batch-size", "4", "--max-history", "3", "--device", "cpu",
           "--results-dir", str(tmp_path / "results")]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    (written,) = (tmp_path / "results").glob("study_data_smollm2_*.json")
    result = json.loads(written.read_text())
    assert result["missing"] == [] and len(result["cells"]) == 3 * 3 * 2
    assert {p["pair"].split(" − ")[0] for p in result["paired"]} >= {"bear/a0/before"}
    assert [v["pair"] for v in result["violations"]] == ["bear − msl", "bear − sft", "msl − sft"]
    # a run saves at every validation check: a killed run loses at most one check's steps
    assert (
        json.loads((tmp_path / "runs" / "data_sft_s0" / "config.json").read_text())["save_every"]
        == 2
    )
    for pair in result["paired"]:  # "rest": the users whose target is not a near copy
        cell = result["cells"][pair["pair"].split(" − ")[0].replace("/", "|")]
        assert pair["hr@10/not_near_copy"]["n"] == cell["hr@10/not_near_copy"]["n"]
    again = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"config"' not in again.stdout  # no run trained again
    assert "test (" not in again.stderr  # no evaluation repeated


def test_a_filtered_study_tests_the_users_the_filter_leaves(tmp_path):
    """study_smollm2.py --min-item-count K (the filtered-catalogue study): every cell is tested on
    the test users that K leaves over the rows trained on (8 of the 30 here), not on the first
    --limit-eval users of the whole test split (20), and the settings record K."""
    data = tiny_synth(tmp_path / "data")
    cmd = [sys.executable, "study_smollm2.py", "--data", str(data), "--model", "tiny",
           "--out", str(tmp_path / "runs"), "--limit-train", "24", "--min-item-count", "2",
           "--limit-eval", "20", "--eval-every", "2", "--valid-rows", "4", "--epochs", "1",
           "--batch-size", "8", "--eval-batch-size", "8", "--max-history", "3", "--device", "cpu",
           "--results-dir", str(tmp_path / "results")]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = load_dataset(data, max_history=3)
    left = filter_catalogue(dataclasses.replace(whole, train=whole.train[:24]), 2).test
    assert len(left) < min(20, len(whole.test))  # the filter is what the count below shows
    (written,) = (tmp_path / "results").glob("study_data_smollm2_*.json")
    result = json.loads(written.read_text())
    assert result["settings"]["min_item_count"] == 2 and result["missing"] == []
    assert {cell["hr@10"]["n"] for cell in result["cells"].values()} == {len(left)}


def _evaluation(ranks: list[int], near: list[bool], violated: list[bool] | None = None) -> dict:
    """One study evaluation's per-user file (RUN/study/<name>.json) with the same ranks under
    both scorings."""
    violated = violated or [False] * len(ranks)
    return {"rank/before": ranks, "rank/after": ranks, "near_copy": near, "violated": violated}


def test_the_study_counts_each_test_user_once_however_many_seeds(monkeypatch):
    """Every seed tests the same users, so a user's value is averaged over the seeds before the
    mean and its standard error over users (n = users); pooling the (seed, user) pairs as
    independent made n = users x seeds and the SE too small by up to sqrt(seeds)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    study = importlib.import_module("study_smollm2")
    near = [True, False, False, False]
    seed0 = _evaluation([0, 3, -1, 12], near)  # hits 1, 1, 0, 0
    seed1 = _evaluation([0, -1, 5, 12], near)  # hits 1, 0, 1, 0
    results = {
        "sft": {0: {"a0": seed0}, 1: {"a0": seed1}},
        "msl": {0: {"a0": _evaluation([-1] * 4, near)}, 1: {"a0": _evaluation([-1] * 4, near)}},
    }
    hr = study._cells(results)["sft|a0|before"]["hr@10"]
    # per user over the seeds: 1, 0.5, 0.5, 0 -> mean 0.5, SD sqrt(1/6), n 4
    assert hr["n"] == 4 and hr["seeds"] == [0.5, 0.5]
    assert math.isclose(hr["mean"], 0.5) and math.isclose(hr["se"], math.sqrt(1 / 6) / 2)
    (pair,) = [p for p in study._paired(results) if p["pair"] == "sft/a0/after − msl/a0/before"]
    assert pair["seeds"] == [0, 1] and pair["hr@10"]["n"] == 4
    assert math.isclose(pair["hr@10"]["se"], hr["se"])  # msl has no hit: the same differences
    rest = pair["hr@10/not_near_copy"]  # users 1-3: 0.5, 0.5, 0
    assert rest["n"] == 3 and math.isclose(rest["mean"], 1 / 3)
    assert rest["seeds"] == [1 / 3, 1 / 3]


def test_the_study_compares_the_losses_on_the_necessary_condition_user_by_user(monkeypatch):
    """a0's per-user "the target fails (3.2)" (a token outside the top-B of its siblings): its
    share per cell, and bear − msl, bear − sft, msl − sft per user over the users and over
    those who are not near copies."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    study = importlib.import_module("study_smollm2")
    near, ranks = [True, False, False, False], [-1] * 4
    results = {
        "msl": {0: {"a0": _evaluation(ranks, near, [True, True, True, False])}},
        "bear": {0: {"a0": _evaluation(ranks, near, [True, False, True, False])}},
        "sft": {0: {"a0": _evaluation(ranks, near, [False, False, False, False])}},
    }
    assert study._cells(results)["msl|a0|after"]["violated"]["mean"] == 0.75
    found = {v["pair"]: v for v in study._paired_violations(results)}
    assert list(found) == ["bear − msl", "bear − sft", "msl − sft"]
    assert found["bear − msl"]["violated"]["mean"] == -0.25
    assert math.isclose(found["bear − msl"]["violated/not_near_copy"]["mean"], -1 / 3)
    assert found["msl − sft"]["violated"]["n"] == 4 and found["msl − sft"]["seeds"] == [0]


def test_every_report_of_a_restarted_study_draws_the_curves_of_every_seed(monkeypatch, tmp_path):
    """A restarted study rewrites its results files after each evaluation, seed 0's (already
    done) first: each plot of the learning curves holds every run of every seed, not just the
    seeds the loop has reached (which overwrote a two-seed plot with seed 0's, and would leave
    it so if the study were stopped there)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    study = importlib.import_module("study_smollm2")
    drawn = []
    monkeypatch.setattr(study, "_train", lambda cfg: None)
    monkeypatch.setattr(
        study, "_evaluate", lambda cfg, device, name: _evaluation([0, -1], [False, False])
        | {"coverage": {}},
    )  # fmt: skip
    monkeypatch.setattr(study, "_plot_curves", lambda runs, out: drawn.append(sorted(runs)))
    argv = ["study_smollm2.py", "--data", str(tmp_path / "Office"), "--seeds", "0", "1",
            "--out", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
            "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    every_run = sorted(f"{loss} s{seed}" for loss in ("sft", "msl", "bear") for seed in (0, 1))
    assert len(drawn) == 2 * 3 * 3 and all(runs == every_run for runs in drawn), drawn[0]


def test_the_study_report_trains_and_evaluates_nothing_and_lists_what_is_missing(tmp_path):
    """--report on a study that has not run: the results files are written, every evaluation
    of every run is listed as missing, and no run folder is created."""
    data = tiny_synth(tmp_path / "data")
    cmd = [sys.executable, "study_smollm2.py", "--data", str(data), "--model", "tiny",
           "--out", str(tmp_path / "runs"), "--seeds", "0", "1", "--device", "cpu",
           "--results-dir", str(tmp_path / "results"), "--report"]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = (tmp_path / "results").glob("study_data_smollm2_*.json")
    result = json.loads(written.read_text())
    assert len(result["missing"]) == 2 * 3 * 3 and result["cells"] == {}
    assert "sft seed 0 a0" in result["missing"] and not (tmp_path / "runs").exists()
    assert "Missing: sft seed 0 a0" in written.with_suffix(".md").read_text()


def test_catalogue_filter_reports_what_bear_train_would_keep(tmp_path):
    """Each (N, K) row of catalogue_filter.py is what `--limit-train N --min-item-count K` leaves
    (the first N rows, then the filter over them), and a K that leaves nothing is a row that
    says so rather than an error."""
    data = tiny_synth(tmp_path / "data")
    cmd = [sys.executable, "catalogue_filter.py", "--data", str(data), "--limits", "16", "0",
           "--min-counts", "2", "100000", "--max-history", "4", "--limit-eval", "5",
           "--results-dir", str(tmp_path / "results")]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "results" / "catalogue_filter_data.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    full = load_dataset(data, max_history=4)
    for row, limit in zip(rows[::2], (16, len(full.train)), strict=True):
        trimmed = dataclasses.replace(full, train=full.train[:limit])
        kept = filter_catalogue(trimmed, 2)
        assert int(row["train_rows_limit"]) == limit and int(row["items"]) == len(kept.titles)
        assert int(row["test_users"]) == len(kept.test) and int(row["tested"]) <= 5
    assert all(r["items"] == "0" and "--min-item-count 100000" in r["note"] for r in rows[1::2])
    for flag, value in (("--limits", "-1"), ("--min-counts", "0")):
        bad = subprocess.run(cmd + [flag, value], cwd=REPO / "benchmarks", env=env,
                             capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 2 and f"{flag}: got [{value}]" in bad.stderr, bad.stderr


def test_kernel_speed_measures_the_cpu_peak_of_each_impl(tmp_path):
    """On the CPU each row carries the peak memory one call adds, from a child process: at least
    the gradient (the logits' size) for the BEAR loss, more for F.cross_entropy (its log-softmax
    and gradient buffers). The logits are 8 MiB: at 2 MiB (256 rows) the probe's resident-set
    noise, about 0.1 of the logits, put the BEAR loss at 0.89-1.01 over seven runs of the same
    case, across the bound (1.04-1.08 at 8 MiB over eight)."""
    cmd = [sys.executable, "kernel_speed.py", "--n-rows", "1024", "--vocab", "4096",
           "--beam-width", "10", "--dtype", "bf16", "--masked-fraction", "0.99", "--impls",
           "torch", "torch_ce", "--modes", "fwd_bwd", "--repeats", "1", "--warmup", "0",
           "--device", "cpu", "--threads", "1", "--results-dir", str(tmp_path)]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("kernel_*.csv")
    rows = {r["impl"]: r for r in csv.DictReader(written.open())}
    ours, ce = (float(rows[i]["peak_over_logits"]) for i in ("torch", "torch_ce"))
    assert 0.9 <= ours < ce, (ours, ce)


def test_catalogue_scale_measures_this_checkout_and_a_baseline(tmp_path):
    """At toy size: one row per (version, size) with every measurement, the plot written."""
    results = tmp_path / "results"
    cmd = [sys.executable, "catalogue_scale.py", "--sizes", "50", "120", "--topk-items", "60",
           "--baseline", str(REPO), "--results-dir", str(results), "--tag", "toy"]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = results.glob("catalogue_scale_*_toy.json")
    rows = json.loads(written.read_text())["rows"]
    assert [(r["version"], r["items"]) for r in rows] == [
        ("this", 50),
        ("this", 120),
        ("baseline", 50),
        ("baseline", 120),
    ]
    assert all(r["beam_search_ms_per_user"] > 0 and r["score_items_ms_per_item"] > 0 for r in rows)
    assert all(r["labels_mask_ms_per_row"] > 0 and r["bytes_per_node"] > 0 for r in rows)
    assert [r["exact_topk_ms_per_user"] is None for r in rows] == [False, True, False, True]
    assert written.with_suffix(".png").is_file() and written.with_suffix(".csv").is_file()


def test_sweep_summary_groups_cells_with_mean_and_standard_error(tmp_path):
    """Groups in numeric order, mean ± SE over the seeds, failed cells left out and counted."""
    head = "cell,loss,seed,reg_weight,status,error,ndcg@10,pr@10\n"
    body = ["a,bear,0,10.0,done,,0.1,0.0", "b,bear,1,10.0,done,,0.3,", "c,bear,0,4.0,done,,0.2,0.5",
            "d,msl,0,,done,,0.05,0.25", "e,bear,2,4.0,failed,boom,,"]  # fmt: skip
    (tmp_path / "sweep.csv").write_text(head + "\n".join(body) + "\n")
    cmd = [sys.executable, "benchmarks/sweep_summary.py", str(tmp_path), "--by", "loss",
           "reg_weight", "--metrics", "ndcg@10", "pr@10"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[2] == "| bear | 4 | 1 | 0.2000 | 0.5000 |"
    assert lines[3] == "| bear | 10 | 2 | 0.2000 ± 0.1000 | 0.0000 |"  # pr@10 of one cell only
    assert lines[4] == "| msl | - | 1 | 0.0500 | 0.2500 |"
    assert "(1 of 5 cells not done: left out)" in done.stdout
    bad = subprocess.run([*cmd[:3], "--by", "lambda"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no column 'lambda'" in bad.stderr
    cmd = [*cmd[:3], "--by", "loss", "--metrics", "ndcg@10", "--pivot", "reg_weight", "seed"]
    pivoted = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert pivoted.returncode == 0, pivoted.stderr
    table = pivoted.stdout.split("ndcg@10:\n\n")[1].splitlines()
    assert table[0] == "| reg_weight \\ seed | 0 | 1 |"  # bear cells only
    assert table[2:4] == ["| 4 | 0.2000 | - |", "| 10 | 0.1000 | 0.3000 |"]


def test_decoding_speed_runs_a_checkpoint_and_counts_its_forwards(tmp_path):
    """--model takes a pretrained checkpoint (here a tiny Llama saved with its tokenizer): the
    special ids come from its tokenizer, both methods agree, each row counts the forwards and the
    token positions of one decoding call, and with --chain-limit 16 ours runs fewer forwards than
    generate's one per title token; --baseline times another checkout's beam search (here this
    one's) beside them and compares its lists; a synthetic catalogue with a checkpoint is
    refused."""
    import csv

    from bear.model import TinyConfig, build_tiny_model
    from bear.tokenizer import train_tokenizer

    titles = json.loads((SHARED_DATA / "Office" / "id2name4Rec.json").read_text()).values()
    tokenizer = train_tokenizer(list(titles), 600)
    special = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    size = TinyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=1024)  # fmt: skip
    model = build_tiny_model(len(tokenizer), *special, size, seed=0)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cmd = [sys.executable, "benchmarks/decoding_speed.py", "--model", str(folder), "--catalogues",
           "Office", "--users", "2", "--batch", "2", "--history", "2", "--device", "cpu",
           "--data", str(SHARED_DATA), "--results-dir", str(tmp_path), "--tag", "ckpt",
           "--chain-limit", "16", "--baseline", str(REPO)]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (table,) = tmp_path.glob("decoding_*_ckpt.csv")
    rows = list(csv.DictReader(table.open()))
    assert [r["method"] for r in rows] == [
        "bear.beam_search",
        "bear.beam_search (baseline checkout)",
        "generate+prefix_allowed_tokens_fn",
    ]
    assert all(r["model"] == str(folder) and float(r["forwards_per_call"]) > 2 for r in rows)
    assert all(float(r["tokens_per_call"]) >= float(r["forwards_per_call"]) for r in rows)
    assert rows[0]["equal_users"] == "2/2" and rows[0]["chain_limit"] == "16"
    assert float(rows[0]["forwards_per_call"]) < float(rows[2]["forwards_per_call"])
    ours, old = rows[0], rows[1]
    assert old["equal_users"] == "2/2" and old["note"].startswith(f"--baseline {REPO}")
    assert (old["forwards_per_call"], old["tokens_per_call"]) == (
        ours["forwards_per_call"],
        ours["tokens_per_call"],
    )
    bad = subprocess.run([*cmd[:4], "--catalogues", "synthetic"], cwd=REPO, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "synthetic catalogue" in bad.stderr


def test_from_checkout_imports_another_checkout_apart_and_refuses_a_folder_without_bear(
    tmp_path, monkeypatch
):
    """--baseline's loader: the other checkout's module, with this checkout's left in place; a
    folder holding no bear/ is an error, not a silent import of this checkout's bear."""
    import shutil

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    common = importlib.import_module("_common")
    other = tmp_path / "other"
    shutil.copytree(REPO / "bear", other / "bear", ignore=shutil.ignore_patterns("__pycache__"))
    metrics = other / "bear" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nMARK = 'other checkout'\n")
    import bear.metrics

    (mark, hit_rate) = common.from_checkout(
        str(other), "bear.metrics:MARK", "bear.metrics:hit_rate"
    )
    assert mark == "other checkout"
    assert Path(hit_rate.__code__.co_filename).resolve() == metrics.resolve()
    assert sys.modules["bear.metrics"] is bear.metrics and not hasattr(bear.metrics, "MARK")
    with pytest.raises(ValueError, match="no bear/__init__.py"):
        common.from_checkout(str(tmp_path / "empty"), "bear.metrics:hit_rate")


def test_decoding_profile_splits_a_call_into_its_parts(tmp_path):
    """One beam search call of a checkpoint (a tiny Llama saved with its tokenizer) split into
    prefill, fed forwards, the blocked output layer (a plain head: forced tokens are scored from
    hidden states) and the rest, which add up to the call; positions run >= real ones."""
    from bear.model import TinyConfig, build_tiny_model
    from bear.tokenizer import train_tokenizer

    titles = json.loads((SHARED_DATA / "Office" / "id2name4Rec.json").read_text()).values()
    tokenizer = train_tokenizer(list(titles), 600)
    special = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    size = TinyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=1024)  # fmt: skip
    folder = tmp_path / "checkpoint"
    build_tiny_model(len(tokenizer), *special, size, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cmd = [sys.executable, "benchmarks/decoding_profile.py", "--model", str(folder), "--users",
           "3", "--history", "2", "--data", str(SHARED_DATA), "--results-dir", str(tmp_path),
           "--tag", "tiny"]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("decoding_profile_*_tiny.json")
    out = json.loads(written.read_text())
    parts = out["seconds"]
    assert set(parts) == {"prefill", "fed forwards", "output layer", "rest"}
    assert all(s >= 0 for s in parts.values()) and parts["output layer"] > 0
    assert math.isclose(sum(parts.values()), out["total_s"], abs_tol=0.005)
    assert out["users"] == 3 and out["fed_forwards"] >= 1
    assert 0 < out["fed_positions_real"] <= out["fed_positions_run"]
    assert 0 < out["prefill_positions_real"] <= out["prefill_positions_run"]
