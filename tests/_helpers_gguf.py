"""A tiny Llama written as a GGUF file (float32 tensors, byte-level BPE tokenizer), for tests of
``--model FILE.gguf`` that do not need a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from bear.model import TinyConfig, build_tiny_model

SIZE = TinyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
# Hugging Face parameter name -> GGUF tensor name (layer 0 of a Llama)
TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
}


def write_tiny_gguf(path: Path, tokenizer) -> Path:
    """Write a seeded one-layer Llama with ``tokenizer`` (a byte-level BPE from
    ``bear.tokenizer.train_tokenizer``) as the GGUF file ``path``."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(tokenizer)
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    special = {a["id"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    model = build_tiny_model(len(tokens), tokenizer.pad_token_id, tokenizer.eos_token_id, SIZE, 0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(SIZE.hidden_size)
    writer.add_feed_forward_length(SIZE.intermediate_size)
    writer.add_block_count(SIZE.num_hidden_layers)
    writer.add_head_count(SIZE.num_attention_heads)
    writer.add_head_count_kv(SIZE.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    state = model.state_dict()
    for name, gguf_name in TENSORS.items():
        writer.add_tensor(gguf_name, state[name].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
