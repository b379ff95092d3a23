"""The run folder: what a run is built from (``Setup``), how its folder is prepared, and its files.

``build_setup`` turns a ``TrainConfig`` into data, tokenizer, model, item tokens and trie; training
and ``python -m bear evaluate`` both start from it; the folder rules are ``bear.run_folder``.
Checkpoints and JSON files are written atomically (a temporary file in the same folder, then a
rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bear.checkpoints import resolve_checkpoint
from bear.config import TrainConfig
from bear.data import Dataset, load_dataset, trained_subset
from bear.faults import disk_full, fault_point, full_disk_error
from bear.items import check_in_context, encode_prompts, item_sequences
from bear.model import (
    LoraSettings,
    TinyConfig,
    build_tiny_model,
    check_model_folder,
    load_pretrained,
    resolve_dtype,
)
from bear.prompts import chat_wrap, format_prompt, format_response
from bear.protocol import PROTOCOLS
from bear.run_folder import read_saved_config, temp_file_beside
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie

__all__ = [
    "Setup",
    "build_setup",
    "resolve_device",
    "load_run_config",
    "write_json_atomic",
    "save_atomic",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

TOKENIZER_SAMPLE = 2000  # training prompts the tiny tokenizer learns from (plus every title)
CONTEXT_CHECK = 512  # training rows whose in-context tokenisation is verified at start


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
    """The torch device of ``--device``: "auto" is this rank's GPU (LOCAL_RANK) if any, else CPU.

    Raises ValueError for a name that is not cpu, cuda or cuda:N, or a GPU this machine lacks.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (resolved.index or 0):
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s); "
                "use --device cpu or auto"
            )
    return resolved


def _tokenizer_texts(data: Dataset) -> list[str]:
    titles = [format_response(t) for t in data.titles.values()]
    rows = data.train[:TOKENIZER_SAMPLE]
    return titles + [format_prompt([data.titles[i] for i in e.history], data.prompt) for e in rows]


def _tiny_tokenizer(cfg: TrainConfig, run: Path, fresh: bool, data: Dataset):
    """The tiny model's tokenizer: the run's own (RUN/tokenizer) when it continues, else that of
    the run its weights come from (``--init``, or ``--reference``: the weights fit its
    vocabulary only), else one trained on the data. ValueError when --init and --reference
    carry different tokenizers."""
    if not fresh and (run / "tokenizer").is_dir():
        return PreTrainedTokenizerFast.from_pretrained(run / "tokenizer")
    runs = (("--init", cfg.init), ("--reference", cfg.reference))
    sources = [(flag, Path(r) / "tokenizer") for flag, r in runs if r is not None]
    for flag, folder in sources:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{flag} {folder.parent}: no tokenizer folder; give a finished run of --model tiny"
            )
    found = [PreTrainedTokenizerFast.from_pretrained(folder) for _, folder in sources]
    if len(found) == 2 and found[0].get_vocab() != found[1].get_vocab():
        raise ValueError(
            f"--reference {cfg.reference}: another tokenizer than --init {cfg.init}'s; give two "
            "runs of one tokenizer (the reference trained from the same start)"
        )
    if found:
        return found[0]
    return train_tokenizer(_tokenizer_texts(data), cfg.vocab_size)


def build_setup(
    cfg: TrainConfig, run: Path, fresh: bool, device: torch.device | None = None
) -> Setup:
    """Load the data, tokenizer (tiny: RUN/tokenizer, --init's, --reference's or trained),
    model, items and trie.

    ``fresh=False`` reuses the tiny tokenizer saved in RUN/tokenizer when there is one. ``device``:
    where the model will run, which ``--dtype auto`` decides on (default: ``cfg.device``).
    Raises FileNotFoundError / ValueError for a ``--model`` that
    ``bear.checkpoints.resolve_checkpoint`` cannot resolve or that resolves to a folder without a
    checkpoint (``bear.model.check_model_folder``), and the data errors of ``bear.data`` /
    ``bear.items``.
    """
    protocol = PROTOCOLS[cfg.protocol]
    data = load_dataset(
        cfg.data,
        cfg.train_file,
        cfg.test_file,
        max_history=cfg.max_history,
        validation=protocol.validation,
        instruction=cfg.instruction,
        history_prefix=cfg.history_prefix,
    )
    data = trained_subset(data, cfg.limit_train, cfg.min_item_count)
    if cfg.dtype == "auto" and device is None:
        device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, cfg.model, device)
    if cfg.model == "tiny":
        tokenizer = _tiny_tokenizer(cfg, run, fresh, data)
        tiny = TinyConfig.from_config(cfg)
        special = (tokenizer.pad_token_id, tokenizer.eos_token_id)
        model = build_tiny_model(len(tokenizer), *special, tiny, cfg.seed).to(dtype)
    else:
        folder = resolve_checkpoint(cfg.model)
        check_model_folder(folder)
        torch.manual_seed(cfg.seed)  # LoRA's initialisation
        model, tokenizer = load_pretrained(folder, LoraSettings.from_config(cfg), dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.prompt == "chat":
        data.prompt = dataclasses.replace(data.prompt, chat=chat_wrap(tokenizer))
    vocab = model.get_output_embeddings().weight.shape[0]
    items = item_sequences(tokenizer, data.titles, data.prompt)
    ids = data.item_ids
    trie = ItemTrie([items[i] for i in ids], ids, tokenizer.eos_token_id, vocab_size=vocab)
    check_in_context(tokenizer, data, data.train[:CONTEXT_CHECK], items)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = {}
    for split in ("train", "valid", "test"):
        inference = split != "train" and protocol.inference_prompt
        rows = getattr(data, split)
        encoded = encode_prompts(tokenizer, data, rows, inference=inference)
        if context is not None:
            fit = (cfg.truncate_history, context, trie.max_len + 1, inference)
            _fit_context(tokenizer, data, split, rows, encoded, items, *fit)
        prompts[split] = encoded
    return Setup(
        data=data,
        tokenizer=tokenizer,
        model=model,
        items=items,
        trie=trie,
        prompts=prompts,
        targets={k: [e.target for e in getattr(data, k)] for k in prompts},
        pad_id=tokenizer.pad_token_id,
    )


def _fit_context(
    tokenizer, data, split, rows, prompts, items, truncate, context, longest, inference
):
    """Check, in place, that each row's prompt and response fit the model's ``context``
    (max_position_embeddings): a training row's own response, an evaluated row's longest title
    (``longest`` tokens with EOS: decoding can reach it). With ``truncate`` a row too long loses
    its oldest history items until it fits; else (or when one history item is still too much)
    ValueError naming the row, its length and the limit."""
    for i, row in enumerate(rows):
        need = len(items[row.target]) + 1 if split == "train" else longest
        while len(prompts[i]) + need > context:
            if not truncate or len(row.history) <= 1:
                what = "its response" if split == "train" else "the longest title"
                raise ValueError(
                    f"{row.source}: its prompt ({len(prompts[i])} tokens) and {what} ({need}) "
                    f"exceed the model's context of {context} positions (max_position_embeddings)"
                    "; pass --truncate-history to drop its oldest history items, or a smaller "
                    "--max-history"
                )
            row = dataclasses.replace(row, history=row.history[1:])
            (prompts[i],) = encode_prompts(tokenizer, data, [row], inference=inference)
        rows[i] = row


def load_run_config(run: Path) -> TrainConfig:
    """The ``TrainConfig`` saved in RUN/config.json (keys this version does not know are dropped).

    A relative ``data`` that does not resolve from here is read where the run resolved it
    (``data_resolved``). Raises FileNotFoundError if RUN/config.json is missing, ValueError if
    it is not a JSON object.
    """
    saved = read_saved_config(run, fix=f"is {run} a bear run folder?")
    if not Path(saved.get("data", "")).is_dir() and "data_resolved" in saved:
        saved["data"] = saved["data_resolved"]  # a relative --data, read from another folder
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to a temporary file beside ``path``, then rename it."""
    _replace_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def save_atomic(path: Path, obj) -> None:
    """torch.save to a temporary file in the same folder, then rename (never a torn checkpoint)."""
    _replace_atomic(path, lambda tmp: torch.save(obj, tmp))


def _replace_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path`` (``bear.run_folder.temp_file_beside``),
    then rename it onto ``path``; the temporary file is removed if the write fails, and a full
    disk raises ``bear.faults.full_disk_error`` (``path`` itself is untouched)."""
    tmp = temp_file_beside(path)
    try:
        write(tmp)
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        if disk_full(exc, path.parent):
            kept = f"the previous {path.name} is intact" if path.exists() else "no file written"
            raise full_disk_error(path, kept) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy a checkpoint's parameters (``bear.model.trainable_state``) into ``model`` in place
    (an FSDP2-sharded parameter takes this rank's shard).

    Raises ValueError naming ``source`` (the checkpoint file) if it names a parameter the model
    does not have or one of another shape (a checkpoint of another model size).
    """
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"{source}: parameters {missing[:3]} not in the model")
    for n, v in state.items():
        if tuple(v.shape) != tuple(params[n].shape):
            raise ValueError(
                f"{source}: parameter {n} has shape {tuple(v.shape)}, the model's is "
                f"{tuple(params[n].shape)}; the checkpoint belongs to another model size"
            )
    with torch.no_grad():
        for n, v in state.items():
            p, v = params[n], v.to(params[n].device)
            if isinstance(p, DTensor):
                v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(v)


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
