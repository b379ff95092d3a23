"""The synthetic dataset: deterministic, loadable, with shared prefixes and popularity skew."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bear.cli import main
from bear.data import load_dataset
from bear.synth import SynthConfig, make_synth, write_synth


def test_same_seed_same_data_and_other_seed_differs():
    a, b, c = (make_synth(SynthConfig(seed=s, num_users=50)) for s in (1, 1, 2))
    assert a == b
    assert a != c


def test_written_folder_loads_in_upstream_format(tmp_path):
    out = write_synth(tmp_path / "s", SynthConfig(num_users=40))
    data = load_dataset(out)
    assert len(data.test) == 40
    assert data.train and data.valid
    assert all(len(e.history) <= 10 for e in data.train)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_synth(out, SynthConfig(num_users=40))
    write_synth(out, SynthConfig(num_users=41), overwrite=True)
    assert len(load_dataset(out).test) == 41
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_catalogue_has_shared_prefixes_and_popularity_skew():
    cfg = SynthConfig(seed=0, num_users=300)
    titles, train, test = make_synth(cfg)
    first_words = Counter(t.split()[0] for t in titles.values())
    assert max(first_words.values()) >= 20  # a brand prefix shared by many items
    assert len(first_words) > 10  # more first words than the beam width: step one is crowded
    counts = Counter(ids[-1] for _, ids, _ in train + test)
    ranked = sorted(counts.values(), reverse=True)
    top = sum(ranked[: len(titles) // 10])
    assert top / sum(ranked) > 0.3  # the 10% most popular items take a large share


def test_shared_words_deepen_the_prefixes_and_change_nothing_else():
    """D shared words go after each title's first word, the same within a (brand, category) or
    niche maker: without them the titles are the D = 0 ones; the rows are the same."""
    base = make_synth(SynthConfig(seed=1, num_users=40))
    deep = make_synth(SynthConfig(seed=1, num_users=40, shared_words=2))
    assert deep[1:] == base[1:]
    stripped = {k: " ".join(t.split()[:1] + t.split()[3:]) for k, t in deep[0].items()}
    assert stripped == base[0]
    groups: dict[tuple[str, ...], set[str]] = {}
    for title in deep[0].values():
        words = title.split()
        groups.setdefault(tuple(words[:3]), set()).add(" ".join(words[3:]))
    assert max(len(v) for v in groups.values()) >= 3  # a group's items branch after 1 + D words
    with pytest.raises(ValueError, match="lines_per_brand: got 9"):
        SynthConfig(lines_per_brand=9)


def test_overwrite_replaces_only_a_synth_dataset_and_keeps_other_files(tmp_path, capsys):
    """--overwrite refuses a folder synth did not write (nothing in it is touched) and, in one it
    wrote, replaces its own files only."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "NOTES.txt").write_text("mine")
    assert main(["synth", "--out", str(mine), "--overwrite"]) == 2
    assert "not one and is left as it is" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["NOTES.txt"]
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--users", "20"]) == 0
    (data / "NOTES.txt").write_text("kept")
    assert main(["synth", "--out", str(data), "--users", "30", "--overwrite"]) == 0
    assert (data / "NOTES.txt").read_text() == "kept"
    assert json.loads((data / "synth_config.json").read_text())["num_users"] == 30
