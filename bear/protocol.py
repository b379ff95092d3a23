"""The two evaluation protocols (SPEC §3): ours and the paper's (``UPSTREAM.md``), side by side.

| setting          | ours                                | upstream (the paper's code)            |
| ---------------- | ----------------------------------- | -------------------------------------- |
| files            | ``train.csv`` / ``test.csv``        | ``train_10000.csv`` / ``test_5000.csv``|
|                  |                                     | (``test.csv`` where no test_5000.csv)  |
| validation       | last 10% of training rows by time   | none: every training row trains        |
| inference prompt | the training prompt                 | a second space ending the first line   |
| length penalty α | 0 (sum of log-probabilities)        | 1.0 (generate's default: score/length) |
| loss normaliser  | counted rows of the optimiser step  | each micro-batch's own mean (upstream) |
| reported         | test of the best epoch on valid     | test after every epoch; per-metric max |
|                  | NDCG@10                             | over epochs                            |

A run's protocol fills the settings the user left unset; an explicit flag wins and is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROTOCOLS",
    "ProtocolDefaults",
    "epoch_checkpoint",
    "resolved_settings",
    "test_file_for",
]


@dataclass(frozen=True)
class ProtocolDefaults:
    """What a protocol sets: the files, the split, the prompts, the decoding and the report."""

    train_file: str
    test_file: str
    validation: bool  # hold out the last 10% of training rows (or valid.csv) for selection
    inference_prompt: bool  # decode with upstream's inference prompt (bear.prompts)
    length_penalty: float  # α of beam search: item score / length^α
    normalisation: str  # one of bear.losses.NORMALISATIONS
    selection: str  # what metrics.json reports, in words


PROTOCOLS = {
    "ours": ProtocolDefaults(
        train_file="train.csv",
        test_file="test.csv",
        validation=True,
        inference_prompt=False,
        length_penalty=0.0,
        normalisation="step",
        selection="test metrics of the one epoch with the best validation ndcg@10",
    ),
    "upstream": ProtocolDefaults(
        train_file="train_10000.csv",
        test_file="test_5000.csv",
        validation=False,
        inference_prompt=True,
        length_penalty=1.0,
        normalisation="micro-batch",
        selection="test metrics after every epoch; test_max = per-metric maximum over epochs",
    ),
}


# Upstream tests on a sample of at most 5000 test rows. A release whose whole test set is smaller
# ships no test_5000.csv: its test.csv is that sample (Office: 1925 rows; ../shared/data/README.md).
UPSTREAM_SMALL_TEST_FILE = "test.csv"


def test_file_for(protocol: str, data_folder: str | Path) -> str:
    """The protocol's test file in ``data_folder``: ``ProtocolDefaults.test_file``, except that
    under ``upstream`` a folder without ``test_5000.csv`` tests on its ``test.csv`` (the whole test
    set, smaller than the sample; recorded in RUN/config.json like every resolved setting)."""
    default = PROTOCOLS[protocol].test_file
    if protocol == "upstream" and not (Path(data_folder) / default).exists():
        return UPSTREAM_SMALL_TEST_FILE
    return default


def epoch_checkpoint(epoch: float) -> str:
    """The file name of the weights after ``epoch`` (a fraction for a stop mid-epoch)."""
    return f"epoch_{epoch:g}.pt"


def resolved_settings(cfg) -> dict:
    """Every setting the run's protocol decides, as resolved for the run ``cfg`` (a
    ``TrainConfig``: explicit flags included), for RUN/config.json."""
    defaults = PROTOCOLS[cfg.protocol]
    return {
        "name": cfg.protocol,
        "train_file": cfg.train_file,
        "test_file": cfg.test_file,
        "validation": defaults.validation,
        "inference_prompt": "two spaces" if defaults.inference_prompt else "the training prompt",
        "length_penalty": cfg.length_penalty,
        "normalisation": cfg.normalisation,
        "selection": defaults.selection,
    }
