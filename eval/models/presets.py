"""Model shapes of real models (and two small ones) for speed benchmarks, built with random weights.

Speed does not depend on weight values, so a benchmark at real shapes needs no download.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
    ),
    "qwen2.5-7b": (
        "Qwen2Config",
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            rope_theta=1000000.0,
        ),
    ),
    "mistral-7b": (
        "MistralConfig",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=32768,
            sliding_window=None,
        ),
    ),
    # Llama-shaped and small enough for a 2-core CPU: 8 layers, 8 KV heads, head_dim 128.
    "llama-8l-cpu": (
        "LlamaConfig",
        dict(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=2816,
            vocab_size=32000,
        ),
    ),
    "tiny": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=512,
        ),
    ),
}


def preset_config(preset: str) -> Any:
    """The transformers config of `preset` (positions enough for any benchmarked context)."""
    import transformers

    config_name, values = PRESETS[preset]
    return getattr(transformers, config_name)(**values, max_position_embeddings=1 << 20, pad_token_id=0)


def build_model(preset: str, dtype: Any, device: Any, seed: int) -> Any:
    """The preset's model with random weights, in eval mode, on `device`."""
    import torch
    import transformers

    config = preset_config(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
