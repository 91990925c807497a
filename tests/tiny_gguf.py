"""Write a tiny Llama with random weights as a GGUF file, as llama.cpp's converter lays one out.

Tensor names and metadata keys are those transformers' GGUF loader reads for the `llama` architecture;
q and k projection rows are permuted the way llama.cpp stores them (transformers undoes it on load);
weights are written as F32 or F16 (no quantization); the tokenizer is the tiny byte-level BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of a q or k projection in llama.cpp's order (each head's two RoPE halves interleaved)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(model: torch.nn.Module, tokenizer, path: Path, dtype: str = "float32") -> Path:
    """Write `model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` to `path` as GGUF; return the path."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    numpy_dtype = np.float16 if dtype == "float16" else np.float32
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}

    def add(name: str, array: np.ndarray) -> None:
        # Norm vectors stay F32, as llama.cpp writes them.
        writer.add_tensor(name, array.astype(np.float32 if array.ndim == 1 else numpy_dtype))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        add(f"blk.{layer}.attn_norm.weight", state[prefix + "input_layernorm.weight"])
        add(f"blk.{layer}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"])
        add(
            f"blk.{layer}.attn_q.weight",
            llama_cpp_permute(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads),
        )
        add(
            f"blk.{layer}.attn_k.weight",
            llama_cpp_permute(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads),
        )
        add(f"blk.{layer}.attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        add(f"blk.{layer}.attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        add(f"blk.{layer}.ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        add(f"blk.{layer}.ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        add(f"blk.{layer}.ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
