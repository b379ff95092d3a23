"""The synthetic dataset: deterministic, loadable, with shared prefixes and popularity skew."""

from __future__ import annotations

from collections import Counter

import pytest

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
