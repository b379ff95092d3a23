"""The run folder: what a run is built from (``Setup``), how its folder is prepared, and its files.

``build_setup`` turns a ``TrainConfig`` into data, tokenizer, model, item tokens and trie; training
and ``python -m bear evaluate`` both start from it. ``prepare_run`` applies the folder rules
(``--overwrite`` replaces only a bear run, ``--resume`` refuses changed settings). Checkpoints and
JSON files are written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bear.config import TrainConfig
from bear.data import Dataset, load_dataset
from bear.items import check_in_context, encode_prompts, item_sequences
from bear.model import LoraSettings, TinyConfig, build_tiny_model, load_pretrained
from bear.prompts import format_prompt, format_response
from bear.protocol import PROTOCOLS
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie

__all__ = [
    "Setup",
    "build_setup",
    "resolve_device",
    "prepare_run",
    "load_run_config",
    "write_json_atomic",
    "save_atomic",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

TOKENIZER_SAMPLE = 2000  # training prompts the tiny tokenizer learns from (plus every title)
CONTEXT_CHECK = 512  # training rows whose in-context tokenisation is verified at start
RESUME_KEYS = ("data", "loss", "model", "seed", "batch_size", "lr", "epochs", "beam_width",
               "protocol", "train_file", "temperature", "normalisation", "topk_weight", "topk_tau",
               "instruction", "history_prefix")  # fmt: skip


@dataclass
class Setup:
    """Data, tokenizer, model and trie of a run."""

    data: Dataset
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    items: dict[int, list[int]]  # item id -> response tokens (no EOS)
    trie: ItemTrie  # on the CPU
    prompts: dict[str, list[list[int]]]  # split -> prompt token lists
    targets: dict[str, list[int]]  # split -> target item ids
    pad_id: int


def resolve_device(device: str) -> torch.device:
    """The torch device of ``--device``: "auto" is this rank's GPU (LOCAL_RANK) if any, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def _tokenizer_texts(data: Dataset) -> list[str]:
    titles = [format_response(t) for t in data.titles.values()]
    rows = data.train[:TOKENIZER_SAMPLE]
    return titles + [format_prompt([data.titles[i] for i in e.history], data.prompt) for e in rows]


def build_setup(cfg: TrainConfig, run: Path, fresh: bool) -> Setup:
    """Load the data, tokenizer (trained for tiny, or RUN/tokenizer), model, items and trie.

    ``fresh=False`` reuses the tiny tokenizer saved in RUN/tokenizer when there is one.
    Raises FileNotFoundError for a ``--model`` that is neither "tiny" nor a folder, and the data
    errors of ``bear.data`` / ``bear.items``.
    """
    protocol = PROTOCOLS[cfg.protocol]
    data = load_dataset(cfg.data, cfg.train_file, cfg.test_file, max_history=cfg.max_history,
                        validation=protocol.validation, instruction=cfg.instruction,
                        history_prefix=cfg.history_prefix)  # fmt: skip
    if cfg.limit_train is not None:
        data.train = data.train[: cfg.limit_train]
    if cfg.model == "tiny":
        tok_dir = run / "tokenizer"
        if not fresh and tok_dir.is_dir():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        else:
            tokenizer = train_tokenizer(_tokenizer_texts(data), cfg.vocab_size)
        tiny = TinyConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=3 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
        )
        model = build_tiny_model(
            len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tiny, cfg.seed
        )
    else:
        if not Path(cfg.model).is_dir():
            raise FileNotFoundError(f"--model {cfg.model}: not 'tiny' and not a local folder")
        torch.manual_seed(cfg.seed)  # LoRA's initialisation
        model, tokenizer = load_pretrained(cfg.model, LoraSettings(target_modules=cfg.lora_targets))
    vocab = model.get_output_embeddings().weight.shape[0]
    items = item_sequences(tokenizer, data.titles, data.prompt)
    ids = data.item_ids
    trie = ItemTrie([items[i] for i in ids], ids, tokenizer.eos_token_id, vocab_size=vocab)
    check_in_context(tokenizer, data, data.train[:CONTEXT_CHECK], items)
    splits = {"train": data.train, "valid": data.valid, "test": data.test}
    return Setup(
        data=data,
        tokenizer=tokenizer,
        model=model,
        items=items,
        trie=trie,
        prompts={
            k: encode_prompts(
                tokenizer, data, v, inference=k != "train" and protocol.inference_prompt
            )
            for k, v in splits.items()
        },
        targets={k: [e.target for e in v] for k, v in splits.items()},
        pad_id=tokenizer.pad_token_id,
    )


def prepare_run(cfg: TrainConfig, run: Path, rank: int) -> None:
    """Check the run folder against ``--resume`` / ``--overwrite`` and create it (rank 0).

    ``--resume`` needs RUN/last.pt and the settings of RESUME_KEYS unchanged (ValueError names the
    setting and both values). Otherwise a non-empty folder needs ``--overwrite`` and must hold a
    bear run (RUN/config.json); rank 0 then empties it. Raises FileNotFoundError /
    FileExistsError / ValueError; nothing is deleted before every check passed.
    """
    if cfg.resume:
        if not (run / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: {run / 'last.pt'} missing; nothing to resume")
        saved = json.loads((run / "config.json").read_text())
        for key in RESUME_KEYS:
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"--resume: {key} is {getattr(cfg, key)!r} but the run used {saved.get(key)!r}"
                )
        return
    if run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"{run}: exists and is not empty; pass --overwrite to reuse it")
        if not (run / "config.json").is_file():
            raise FileExistsError(f"{run}: not a bear run folder (no config.json); not deleting it")
        if rank == 0:
            shutil.rmtree(run)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)


def load_run_config(run: Path) -> TrainConfig:
    """The ``TrainConfig`` saved in RUN/config.json (keys this version does not know are dropped).

    Raises FileNotFoundError if RUN/config.json is missing.
    """
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; is {run} a bear run folder?")
    saved = json.loads(config_path.read_text())
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to a temporary file beside ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def save_atomic(path: Path, obj) -> None:
    """torch.save to a temporary file in the same folder, then rename (never a torn checkpoint)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's parameters (``bear.model.trainable_state``) into ``model`` in place.

    Raises ValueError if the checkpoint names a parameter the model does not have.
    """
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint: parameters {missing[:3]} not in the model")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


def rng_state() -> dict:
    """The torch, numpy and Python random states, for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore the random states saved by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
