"""Tiny models of every architecture doublesparse serves, built from configs with random weights."""

from __future__ import annotations

import torch
import transformers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral")

_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
}


def tiny_config(arch: str, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 2, **overrides):
    """A config of `arch` small enough for CPU tests (vocab 128; pad 0, eos 1, bos 2)."""
    config_name, _, extra = _CONFIGS[arch]
    values = dict(
        num_hidden_layers=num_layers,
        hidden_size=num_heads * head_dim,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=2 * num_heads * head_dim,
        vocab_size=128,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(extra)
    values.update(overrides)
    return getattr(transformers, config_name)(**values)


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_overrides):
    """A randomly initialised tiny model of `arch`, in eval mode."""
    _, model_name, _ = _CONFIGS[arch]
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def random_channel_mask(model, *, seed: int = 0, per_kv_head: bool = False):
    """A valid ChannelMask for `model` with random rankings (no calibration needed)."""
    from doublesparse import ChannelMask, HeadLayout

    layout = HeadLayout.from_config(model.config)
    generator = torch.Generator().manual_seed(seed)
    heads = layout.num_kv_heads if per_kv_head else layout.num_heads
    ranking = torch.rand(layout.num_layers, heads, layout.head_dim, generator=generator).argsort(dim=-1)
    return ChannelMask(ranking, "qk", layout, per_kv_head=per_kv_head)


def left_padded_batch(lengths, *, vocab_size: int = 128, seed: int = 0):
    """Random token ids [B, max(lengths)] with left padding (pad id 0) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask
