"""Tiny models of every architecture doublesparse serves, built from configs with random weights."""

from __future__ import annotations

import torch
import transformers

# The foundation's architectures (tested across selection modes, padding, beam search...).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral")

# Sliding-window layers alternate with full ones in these (a window of 6 tokens, so that it bites).
_ALTERNATING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6}
# Multi-head latent attention: keys of 32 no-RoPE + 16 RoPE channels, values of 32, a latent of 16.
_MLA = {"kv_lora_rank": 16, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

# arch -> (config class, model class, config fields); the keys are transformers' model types.
_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None,
    }),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _MOE),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_MOE, "shared_expert_intermediate_size": 32}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    # Weights 5x the usual size, so that the cap of 2 bites (logits of a few units; the scaling 1/sqrt(head_dim)).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        **_ALTERNATING, "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16, "initializer_range": 0.1,
    }),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _ALTERNATING),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", _ALTERNATING),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": None}),
    "glm": ("GlmConfig", "GlmForCausalLM", {}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        **_ALTERNATING, "num_local_experts": 4, "num_experts_per_tok": 2,
    }),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_MLA, "q_lora_rank": 24, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1, "moe_intermediate_size": 32,
    }),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
        **_MLA, "q_lora_rank": None, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "moe_intermediate_size": 32,
    }),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", {
        **_MLA, "q_lora_rank": 24, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1,
    }),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", {**_MLA, "q_lora_rank": 24}),
    "youtu": ("YoutuConfig", "YoutuForCausalLM", {**_MLA, "q_lora_rank": 24}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1,
    }),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", _ALTERNATING),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", _ALTERNATING),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", _ALTERNATING),
    # The second layer without RoPE (SmolLM3 leaves every fourth one without).
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", {
        **_ALTERNATING, "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16, "initializer_range": 0.1,
    }),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", {}),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", {}),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", {}),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", {}),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", {}),
}  # fmt: skip

# Every architecture of the tested matrix (doublesparse/architectures.py), in the README's order.
MATRIX = tuple(_CONFIGS)

# transformers serves these with eager attention only (SDPA would drop their sinks / softcapping).
EAGER_ONLY = {"gpt_oss", "gemma2", "vaultgemma"}
# Query heads and KV heads are one count in these (MLA expands keys per query head; GPT-NeoX is MHA).
ONE_KV_HEAD_PER_QUERY_HEAD = {"deepseek_v3", "deepseek_v2", "glm4_moe_lite", "minicpm3", "youtu", "gpt_neox"}


def tiny_config(
    arch: str, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, num_layers: int = 2, **overrides
):
    """A config of `arch` small enough for CPU tests (vocab 128; pad 0, eos 1, bos 2)."""
    config_name, _, extra = _CONFIGS[arch]
    if arch in ONE_KV_HEAD_PER_QUERY_HEAD:
        num_kv_heads = num_heads
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
    if "qk_rope_head_dim" in extra:  # an MLA config derives its head_dim (the RoPE part) itself
        del values["head_dim"]
    values.update(extra)
    if "layer_types" in values and num_layers != 2 and "layer_types" not in overrides:
        values["layer_types"] = [values["layer_types"][i % 2] for i in range(num_layers)]
    values.update(overrides)
    return getattr(transformers, config_name)(**values)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides,
):
    """A randomly initialised tiny model of `arch`, in eval mode (eager attention where SDPA is not served)."""
    _, model_name, _ = _CONFIGS[arch]
    config = tiny_config(arch, **config_overrides)
    if arch in EAGER_ONLY:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        for module in model.modules():
            sinks = getattr(module, "sinks", None)
            if isinstance(sinks, torch.Tensor):  # learned sinks of a size that matters (transformers inits them ~0)
                sinks.copy_(2 * torch.randn(sinks.shape, generator=torch.Generator().manual_seed(seed)))
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
