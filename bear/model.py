"""Models: a tiny Llama built from a config (full fine-tuning) or a local checkpoint with LoRA, the
helpers that call them the same way in training and evaluation, and a run's model in Hugging Face
format (``RUN/model/``: ``save_run_model`` writes it, ``load_run`` opens it)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bear.checkpoints import SMOLLM2, resolve_checkpoint
from bear.config import TrainConfig
from bear.faults import disk_full, fault_point, full_disk_error

__all__ = [
    "DTYPES",
    "native_bf16",
    "resolve_dtype",
    "TinyConfig",
    "LoraSettings",
    "build_tiny_model",
    "check_model_folder",
    "load_pretrained",
    "trainable_state",
    "save_run_model",
    "load_run",
    "response_logits",
    "autocast_for",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype -> the base weights' dtype


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively: a CUDA GPU that supports bf16, or
    a CPU with AVX512-BF16 or AMX (there a LoRA step of SmolLM2-135M measured 1.3-1.6x faster in
    bf16 than in fp32: benchmarks/README.md, "Training step with a real checkpoint")."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: str, model: str, device: torch.device | None) -> torch.dtype:
    """The base weights' dtype of ``--dtype`` (``fp32``, ``bf16`` or ``auto``).

    ``auto``: bf16 for a checkpoint model (``--model`` other than ``tiny``) on a device with
    ``native_bf16``, fp32 otherwise (the tiny model is small enough that fp32 costs little and
    its tests compare fp32 results). An explicit ``bf16`` on a known ``device`` without native
    bf16 is honoured with a ``UserWarning``: there its matrix products are emulated (on an
    AVX2-only CPU a SmolLM2 LoRA step took 35x its fp32 time: benchmarks/README.md, "Training
    step with a real checkpoint"). ``device`` may be None for an explicit dtype. Raises ValueError
    for another name.
    """
    if dtype == "auto":
        return torch.bfloat16 if model != "tiny" and native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    if DTYPES[dtype] == torch.bfloat16 and device is not None and not native_bf16(device):
        warnings.warn(
            f"--dtype bf16 (given, or the run's) on {device.type}, which has no native bf16 "
            "matrix products (a CPU without AVX512-BF16 or AMX, a GPU before Ampere): they are "
            "emulated there, many times slower than fp32; train with --dtype auto or fp32, or "
            "run on a device with native bf16",
            stacklevel=2,
        )
    return DTYPES[dtype]


def _default(name: str):
    """The default of the TrainConfig field ``name``: model sizes are written once, there."""
    return TrainConfig.__dataclass_fields__[name].default


TINY_MLP_RATIO = 3  # the tiny Llama's MLP width per unit of model width
TINY_CONTEXT = 2048  # the tiny Llama's RoPE table: its longest prompt + response


@dataclass(frozen=True)
class TinyConfig:
    """Size of the tiny Llama (``--model tiny``, defaults: TrainConfig's); vocab_size comes from
    the trained tokenizer."""

    hidden_size: int = _default("hidden_size")  # model width
    intermediate_size: int | None = None  # MLP width (None: TINY_MLP_RATIO · hidden_size)
    num_hidden_layers: int = _default("num_layers")  # decoder blocks
    num_attention_heads: int = _default("num_heads")  # heads (key/value heads: the same)
    max_position_embeddings: int = TINY_CONTEXT

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TinyConfig:
        return cls(cfg.hidden_size, None, cfg.num_layers, cfg.num_heads)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA for ``--model PATH`` (defaults: TrainConfig's, upstream's values)."""

    r: int = _default("lora_r")  # rank
    alpha: float = _default("lora_alpha")  # scaling numerator (scale = alpha / r)
    dropout: float = _default("lora_dropout")  # dropout on the LoRA input
    target_modules: tuple[str, ...] = _default("lora_targets")  # modules that get adapters

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LoraSettings:
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def build_tiny_model(vocab_size: int, pad_id: int, eos_id: int, cfg: TinyConfig, seed: int):
    """A randomly initialised LlamaForCausalLM of the given size (seeded, float32)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or TINY_MLP_RATIO * cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# What a Hugging Face checkpoint folder holds: its config, weights (one file or a sharded index)
# and a tokenizer (a fast tokenizer.json, or a slow tokenizer's vocabulary / sentencepiece model).
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHECKPOINT_TOKENIZER = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)


def check_model_folder(path: str | Path) -> None:
    """Raise unless ``path`` is a local Hugging Face checkpoint folder that ``load_pretrained`` can
    read: CHECKPOINT_CONFIG, one of CHECKPOINT_WEIGHTS and one of CHECKPOINT_TOKENIZER.

    Raises FileNotFoundError if ``path`` is not a folder, ValueError naming what is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: not 'tiny' and not a local folder")
    missing = []
    if not (folder / CHECKPOINT_CONFIG).is_file():
        missing.append(CHECKPOINT_CONFIG)
    for kind, names in (("weights", CHECKPOINT_WEIGHTS), ("tokenizer", CHECKPOINT_TOKENIZER)):
        if not any((folder / name).is_file() for name in names):
            missing.append(f"{kind} ({' or '.join(names)})")
    if missing:
        raise ValueError(
            f"--model {path}: not a Hugging Face checkpoint folder, it lacks {'; '.join(missing)}; "
            "a checkpoint folder holds config.json, the weights and the tokenizer files, as "
            "save_pretrained writes them"
        )


def load_pretrained(path: str, lora: LoraSettings, dtype: torch.dtype = torch.float32):
    """(model with LoRA adapters, tokenizer) from a local Hugging Face checkpoint folder.

    The base weights are loaded in ``dtype``; the adapters are float32 (peft's default upcast). The
    adapter's config names the folder by its absolute path; ``save_run_model`` records a portable
    reference in RUN/model instead (``base_reference``).
    """
    from peft import LoraConfig, get_peft_model

    path = str(Path(path).resolve())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {path}: the tokenizer has no EOS token; responses end with EOS")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), tokenizer


def trainable_state(model) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters by name (all of the tiny model; the adapters under
    LoRA): what a checkpoint stores and ``bear.run.load_weights`` restores. FSDP2-sharded
    parameters are gathered whole, so under ``--fsdp`` every rank must call it."""
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def save_run_model(
    model, tokenizer, folder: Path, state: dict[str, torch.Tensor], base: str | None = None
) -> None:
    """Write ``state`` (a ``trainable_state``) as ``model.save_pretrained`` does, and the tokenizer.

    A peft model gives its LoRA adapter (adapter_config.json + adapter_model.safetensors) whose
    ``base_model_name_or_path`` is ``base_reference(base, folder)`` where ``base`` (the run's
    ``--model``) is given, so that the run folder travels with its base; the tiny model gives
    the whole model. Written to a hidden folder beside ``folder``, then renamed into place; a
    full disk raises ``bear.faults.full_disk_error`` (the hidden folder removed).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        adapter = tmp / "adapter_config.json"
        if base is not None and adapter.is_file():
            config = json.loads(adapter.read_text())
            config["base_model_name_or_path"] = base_reference(base, folder)
            adapter.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        fault_point(f"write:{folder.name}")
    except Exception as exc:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc, folder.parent):
            raise full_disk_error(folder, "the run's checkpoints are intact") from exc
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def base_reference(model: str, folder: Path) -> str:
    """How RUN/model records a LoRA run's base: ``smollm2-135m`` as is (a model id), a local
    folder or FILE.gguf as a path relative to ``folder`` (RUN/model), so that a run moved or
    copied together with its base still finds it (``load_run``)."""
    if model == SMOLLM2:
        return model
    return os.path.relpath(Path(model).expanduser().resolve(), Path(folder).resolve())


def _base_model_folder(folder: Path, recorded: str, base: str | None) -> Path:
    """The Hugging Face folder of a LoRA run's base: ``base`` where given, else the recorded
    reference (a model id, a path relative to RUN/model, or an absolute path)."""
    if base is not None:
        return resolve_checkpoint(str(base))
    if recorded == SMOLLM2:
        return resolve_checkpoint(recorded)
    path = Path(recorded) if Path(recorded).is_absolute() else folder / recorded
    if not path.exists():
        raise FileNotFoundError(
            f"{folder}: its base model {recorded!r} ({path.resolve()}) is missing; move the run "
            "and its base together, or pass load_run(run, base=FOLDER_OR_GGUF)"
        )
    return resolve_checkpoint(str(path))


def load_run(run_dir, dtype: torch.dtype = torch.float32, base: str | None = None):
    """(model, tokenizer) of a training run's ``RUN/model/``, in eval mode, for inference.

    A LoRA run loads its base model in ``dtype`` and adds the adapter (``peft.PeftModel``): the
    base is ``base`` (a checkpoint folder, FILE.gguf or ``smollm2-135m``) where given, else the
    one adapter_config.json records (``base_reference``: an id, or a path relative to
    RUN/model). A tiny run loads the whole model in ``dtype``.
    Raises FileNotFoundError if RUN/model/ is missing (a run that has not finished), lacks a
    file, or its base is not where it was recorded (pass ``base=``); ValueError naming the
    folder if a file is damaged or another model's, or its tokenizer is not its model's.
    """
    folder = Path(run_dir) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing; RUN/model/ is written when training ends")
    lora = (folder / "adapter_config.json").is_file()
    _check_run_files(folder, lora)
    damaged = "a file is damaged or belongs to another model: restore the folder, or train again"
    tokenizer = _loaded(
        folder, damaged, AutoTokenizer.from_pretrained, folder, local_files_only=True
    )
    if lora:
        from peft import PeftConfig, PeftModel

        config = _loaded(folder, damaged, PeftConfig.from_pretrained, folder)
        base_folder = _base_model_folder(folder, config.base_model_name_or_path, base)
        fix = "restore it, or pass load_run(run, base=FOLDER_OR_GGUF)"
        base_model = _loaded(base_folder, f"the run's base model: {fix}",
                             AutoModelForCausalLM.from_pretrained, base_folder,
                             local_files_only=True, dtype=dtype)  # fmt: skip
        model = _loaded(folder, damaged, PeftModel.from_pretrained, base_model, folder)
    else:
        model = _loaded(folder, damaged, AutoModelForCausalLM.from_pretrained, folder,
                        local_files_only=True, dtype=dtype)  # fmt: skip
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab or (not lora and len(tokenizer) != vocab):
        raise ValueError(
            f"{folder}: its tokenizer has {len(tokenizer)} tokens, its model {vocab}; the folder "
            "mixes two runs' files: restore its own tokenizer files"
        )
    return model.eval(), tokenizer


def _loaded(where: Path, fix: str, load, *args, **kwargs):
    """``load(*args, **kwargs)``; a library's error (a damaged or foreign file) becomes a
    ValueError naming ``where`` and ``fix``. Running out of memory is not a damaged file."""
    try:
        return load(*args, **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{where}: cannot load it ({type(exc).__name__}: {first[:200]}); {fix}"
        ) from exc


# the files RUN/model holds (any one of each group), by kind of run
_RUN_FILES = {
    "lora": (("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin")),
    "tiny": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _check_run_files(folder: Path, lora: bool) -> None:
    """FileNotFoundError naming the first file RUN/model lacks (the model's, the tokenizer's)."""
    for group in (*_RUN_FILES["lora" if lora else "tiny"], _TOKENIZER_FILES):
        if not any((folder / name).is_file() for name in group):
            raise FileNotFoundError(
                f"{folder}: {' or '.join(group)} is missing; the folder is incomplete: restore "
                "it, or train the run again"
            )


def response_logits(model, batch) -> torch.Tensor:
    """(U, W, V) logits of the positions that predict the right-aligned response targets of a
    ``bear.items.Batch``."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.width,
        use_cache=False,
    )
    return out.logits


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
