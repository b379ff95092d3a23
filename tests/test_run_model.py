"""A run in the Hugging Face world: RUN/model/ opens in transformers / peft with the trained logits,
the dtype / gradient-checkpointing / LoRA-shape flags do what they say, TensorBoard events hold the
run's scalars."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from _helpers_train import last_weights, tiny_checkpoint, tiny_config, tiny_synth
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bear.losses import LossSettings, build_loss
from bear.model import load_run, resolve_dtype
from bear.run import build_setup, load_weights
from bear.tensorboard import _masked_crc32c
from bear.train import train
from bear.train_step import StepContext, accumulate_gradients, micro_batches

TOKENS = torch.tensor([[5, 9, 2, 7, 11, 3]])  # any in-vocabulary ids


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("hf") / "synth")


@pytest.fixture(scope="module")
def tiny_run(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("hf") / "tiny"
    train(tiny_config(synth, run, limit_eval=2, beam_width=4))
    return run


def _trained_logits(cfg) -> torch.Tensor:
    """Logits of the run's own model rebuilt by bear with its selected (here: last) weights."""
    setup = build_setup(cfg, Path(cfg.out), fresh=False)
    load_weights(setup.model, last_weights(cfg.out))
    with torch.no_grad():
        return setup.model.eval()(input_ids=TOKENS).logits


def test_tiny_run_opens_in_transformers_with_the_trained_logits(synth, tiny_run):
    folder = tiny_run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    direct = AutoModelForCausalLM.from_pretrained(folder).eval()
    model, tokenizer = load_run(tiny_run)
    with torch.no_grad():
        logits = direct(input_ids=TOKENS).logits
        torch.testing.assert_close(model(input_ids=TOKENS).logits, logits, rtol=0, atol=0)
    cfg = tiny_config(synth, tiny_run, limit_eval=2, beam_width=4)
    torch.testing.assert_close(_trained_logits(cfg), logits, rtol=0, atol=0)
    assert (
        tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_run / "tokenizer").get_vocab()
    )


def test_lora_run_is_a_peft_adapter_with_the_lora_flags(synth, tmp_path):
    base = tiny_checkpoint(synth, tmp_path / "ckpt")
    cfg = tiny_config(synth, tmp_path / "run", model=str(base), validate=False, lr=1e-2,
                      lora_r=4, lora_alpha=8.0, lora_dropout=0.1, dtype="fp32",
                      lora_targets=("q_proj", "k_proj"))  # fmt: skip
    train(cfg)
    folder = tmp_path / "run" / "model"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8.0, 0.1)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj"}
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    model, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        logits = direct(input_ids=TOKENS).logits
        torch.testing.assert_close(model(input_ids=TOKENS).logits, logits, rtol=0, atol=0)
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=TOKENS).logits
    torch.testing.assert_close(_trained_logits(cfg), logits, rtol=0, atol=0)
    assert not torch.equal(plain, logits)  # the adapter was trained and is applied


def test_a_lora_run_travels_with_its_base(synth, tmp_path):
    """The adapter records its base relative to RUN/model: the run and its base moved together
    still load; moved apart, load_run names the missing base, and base= finds it."""
    import shutil

    project = tmp_path / "project"
    base = tiny_checkpoint(synth, project / "ckpt")
    train(tiny_config(synth, project / "run", model=str(base), validate=False, lr=1e-2))
    recorded = json.loads((project / "run" / "model" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "../../ckpt"
    with torch.no_grad():
        logits = load_run(project / "run")[0](input_ids=TOKENS).logits
    moved = shutil.move(project, tmp_path / "elsewhere")
    with torch.no_grad():
        torch.testing.assert_close(load_run(moved / "run")[0](input_ids=TOKENS).logits, logits)
    alone = shutil.move(moved / "run", tmp_path / "alone")
    with pytest.raises(FileNotFoundError, match=r"base model '../../ckpt' .* base="):
        load_run(alone)
    model, _ = load_run(alone, base=str(moved / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS).logits, logits)
    (alone / "model" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"alone/model: cannot load it .* restore the folder"):
        load_run(alone, base=str(moved / "ckpt"))


def test_the_smollm2_id_is_recorded_as_an_id(tmp_path):
    from bear.model import base_reference

    assert base_reference("smollm2-135m", tmp_path / "run" / "model") == "smollm2-135m"
    assert base_reference(str(tmp_path / "m.gguf"), tmp_path / "run" / "model") == "../../m.gguf"


def _damaged_copy(tiny_run, tmp_path, damage) -> Path:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run / "model", run / "model")
    damage(run / "model")
    return run


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _foreign_weights(folder):
    """Another model size's weights under this model's config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 64, 96
    LlamaForCausalLM(config).save_pretrained(folder / "other")
    (folder / "other" / "model.safetensors").replace(folder / "model.safetensors")


def _foreign_tokenizer(folder):
    from bear.tokenizer import train_tokenizer

    train_tokenizer(["a b c d e f g h"] * 3, 300).save_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (_truncate, ValueError, "cannot load it .*damaged or belongs to another model"),
        (lambda f: (f / "config.json").unlink(), FileNotFoundError, "config.json is missing"),
        (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
         FileNotFoundError, "tokenizer.json or tokenizer_config.json is missing"),
        (_foreign_weights, ValueError, "cannot load it"),
        (_foreign_tokenizer, ValueError, r"tokenizer has \d+ tokens, its model 320; .* two runs"),
    ],
    ids=["truncated-weights", "no-config", "no-tokenizer", "foreign-weights", "foreign-tokenizer"],
)  # fmt: skip
def test_load_run_names_a_damaged_or_mixed_folder(tiny_run, tmp_path, damage, error, message):
    run = _damaged_copy(tiny_run, tmp_path, damage)
    with pytest.raises(error, match=message) as caught:
        load_run(run)
    assert str(run / "model") in str(caught.value)


def test_load_run_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="RUN/model"):
        load_run(tmp_path)


def test_dtype_bf16_stores_the_base_in_bf16_and_keeps_adapters_fp32(synth, tmp_path):
    base = tiny_checkpoint(synth, tmp_path / "ckpt")
    cfg = tiny_config(synth, tmp_path / "run", model=str(base), dtype="bf16")
    model = build_setup(cfg, tmp_path / "run", fresh=True).model
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    tiny = build_setup(tiny_config(synth, tmp_path / "t", dtype="bf16"), tmp_path / "t", True)
    assert {p.dtype for p in tiny.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(synth, tmp_path / "t", dtype="fp16")


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bf16_for_a_checkpoint_where_bf16_is_native(synth, tmp_path, monkeypatch,
                                                                    native):  # fmt: skip
    """--dtype auto (the default): a checkpoint's base weights in bf16 on a device with native
    bf16 (a GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere; the tiny model stays
    fp32 either way."""
    monkeypatch.setattr("bear.model.native_bf16", lambda device: native)
    base = tiny_checkpoint(synth, tmp_path / "ckpt")
    cfg = tiny_config(synth, tmp_path / "run", model=str(base))
    assert cfg.dtype == "auto"
    model = build_setup(cfg, tmp_path / "run", fresh=True).model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if native else torch.float32}
    tiny = build_setup(tiny_config(synth, tmp_path / "t"), tmp_path / "t", True)
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}


def test_an_explicit_bf16_without_native_bf16_is_honoured_with_a_warning(synth, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """--dtype bf16 where bf16 products are emulated (an AVX2-only CPU): bf16 as asked, and a
    warning naming the flag and the fix, also through build_setup on the device a run names (as
    `bear train` and `bear evaluate` call it); no warning for fp32, auto, a native device or an
    unknown one (an explicit dtype needs no device)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr("bear.model.native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match=r"--dtype bf16 .* on cpu.*emulated.*--dtype auto or fp32"):
        assert resolve_dtype("bf16", "smollm2-135m", cpu) == torch.bfloat16
    base = tiny_checkpoint(synth, tmp_path / "ckpt")
    cfg = tiny_config(synth, tmp_path / "run", model=str(base), dtype="bf16")
    with pytest.warns(UserWarning, match="--dtype bf16"):
        model = build_setup(cfg, tmp_path / "run", fresh=True, device=cpu).model
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("fp32", "smollm2-135m", cpu) == torch.float32
        assert resolve_dtype("auto", "smollm2-135m", cpu) == torch.float32
        assert resolve_dtype("bf16", "smollm2-135m", None) == torch.bfloat16
        monkeypatch.setattr("bear.model.native_bf16", lambda device: True)
        assert resolve_dtype("bf16", "smollm2-135m", cpu) == torch.bfloat16


def test_build_setup_does_not_need_the_training_device(synth, tmp_path):
    """Re-evaluating a run elsewhere: a config saved with --device cuda builds on the CPU when
    the caller names the device (and with an explicit --dtype, without asking for any)."""
    base = tiny_checkpoint(synth, tmp_path / "ckpt")
    for dtype in ("fp32", "auto"):
        cfg = tiny_config(synth, tmp_path / dtype, model=str(base), device="cuda", dtype=dtype)
        setup = build_setup(cfg, tmp_path / dtype, True, device=torch.device("cpu"))
        assert setup.model is not None


def test_gradient_checkpointing_gives_the_same_gradient(synth, tmp_path):
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            synth, tmp_path / "r", limit_train=5, gradient_checkpointing=checkpointing
        )
        setup = build_setup(cfg, tmp_path / "r", fresh=True)
        assert setup.model.is_gradient_checkpointing == checkpointing
        setup.model.train()
        loss = build_loss(LossSettings("bear", beam_width=4))
        ctx = StepContext(setup.model, setup.trie, torch.device("cpu"))
        micro = micro_batches(setup, list(range(5)), loss, ctx, cfg.micro_batch_size)
        accumulate_gradients(ctx, micro, loss)
        grads.append({n: p.grad for n, p in setup.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-6, msg=name)


def _read_events(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of each scalar event of a TFRecord event file, checking both CRCs."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        assert struct.unpack_from("<I", data, pos + 8)[0] == _masked_crc32c(data[pos : pos + 8])
        event = data[pos + 12 : pos + 12 + length]
        assert struct.unpack_from("<I", data, pos + 12 + length)[0] == _masked_crc32c(event)
        pos += 16 + length
        fields = dict(_fields(event))
        if 5 in fields:  # summary
            values = [dict(_fields(v)) for n, v in _fields(fields[5]) if n == 1]
            scalars = {v[1].decode(): struct.unpack("<f", v[2])[0] for v in values}
            out.append((fields[2], scalars))
    return out


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message (varint, 64-bit, bytes, 32-bit)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            value, pos = buf[pos : pos + 4], pos + 4
        yield number, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def test_crc32c_is_castagnoli():
    crc = 0xE3069283  # CRC-32C of b"123456789", the standard check value
    masked = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    assert _masked_crc32c(b"123456789") == masked


def test_tensorboard_events_hold_loss_and_validation_metrics(tiny_run):
    (events,) = tiny_run.glob("events.out.tfevents.*")
    scalars = _read_events(events)
    log = [json.loads(x) for x in (tiny_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "step"]
    losses = [(s, v["train/loss"]) for s, v in scalars if "train/loss" in v]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    (valid,) = [v for _, v in scalars if "valid/ndcg@10" in v]
    (test,) = [v for _, v in scalars if "test/ndcg@10" in v]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert valid["valid/hr@10"] == pytest.approx(metrics["valid"]["hr@10"])
    assert test["test/ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"])


def test_tensorboard_reads_the_events(tiny_run):
    """Where tensorboard is installed, its own reader sees the same scalars."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    acc = event_accumulator.EventAccumulator(str(tiny_run))
    acc.Reload()
    assert {"train/loss", "valid/ndcg@10", "test/ndcg@10"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_overwrite_replaces_the_model_folder_and_the_event_file(synth, tmp_path):
    """RUN/model/ and the TensorBoard events are files bear writes: --overwrite replaces them, so
    TensorBoard does not show the old run's steps beside the new one's."""
    train(tiny_config(synth, tmp_path / "run", validate=False))
    (tmp_path / "run" / "model" / "stale.txt").write_text("from the first run")
    train(tiny_config(synth, tmp_path / "run", validate=False, overwrite=True))
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert not (tmp_path / "run" / "model" / "stale.txt").exists()
