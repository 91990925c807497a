"""The architectures doublesparse is tested on, and where RoPE puts the rotary channels of their keys.

`TESTED` is the matrix of tests/test_architectures.py: each entry was built from a tiny config with
random weights and checked to equal the dense model at full budget, an independent reference at a small
budget, and the unpatched model with a 4D mask at a budget of length - 1. A model of another type is
still served where its attention calls look like these (support.py checks them), with a warning that
names it as untested.

RoPE pairs (for `keep_rope_pairs`) are architecture facts that no config field states: which channels
of a post-RoPE key turn together. rotate_half models (Llama and most others) turn channel c with
c + d/2; Cohere, GLM, GLM-4, Helium, ERNIE 4.5 and DeepSeek-V2 (complex multiplication) turn adjacent
channels. DeepSeek-V3 keeps rotate_half pairs in the post-RoPE key whatever its `rope_interleave` says:
with it set, the model de-interleaves its weights' channel order before rotating. MLA keys carry their
rotary channels last (after `qk_nope_head_dim`); partial rotary models (Phi, GLM, GPT-NeoX) first.
Cohere2's full-attention layers (the sparse ones) have no RoPE, nor have EXAONE 4's when it is windowed;
SmolLM3 leaves some layers without RoPE, so that no one pairing fits a whole mask (refused).
tests/test_architectures.py measures every entry's pairs from the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .layout import HeadLayout, is_mla
from .ranking import RopePairs


@dataclass(frozen=True)
class Architecture:
    """One tested architecture: its transformers `model_type`, a display name, what is special about it,
    and how RoPE pairs the rotary channels of the keys of its full-attention layers (the ones made sparse):
    "half" (rotate_half), "interleaved" (adjacent channels), "none" (no RoPE there), "windowed-none" (none
    where the config has a sliding window, else rotate_half) or "mixed" (some of them without RoPE, so that
    no one pairing fits every layer)."""

    model_type: str
    name: str
    special: str
    rope: str = "half"


TESTED: dict[str, Architecture] = {
    entry.model_type: entry
    for entry in (
        Architecture("llama", "Llama", "GQA, the reference architecture"),
        Architecture("mistral", "Mistral", "sliding window off (on: its layers stay dense)"),
        Architecture("qwen2", "Qwen2", "q/k/v biases"),
        Architecture("qwen3", "Qwen3", "q/k RMSNorm before RoPE"),
        Architecture("qwen3_moe", "Qwen3-MoE", "q/k norm, mixture of experts"),
        Architecture("qwen2_moe", "Qwen2-MoE", "mixture of experts with a shared expert"),
        Architecture("phi3", "Phi-3", "fused qkv projection"),
        Architecture("phi", "Phi", "partial rotary (half the channels), dense MLP in parallel"),
        Architecture("mixtral", "Mixtral", "mixture of experts"),
        Architecture("gemma", "Gemma", "scaled embeddings, GeGLU MLP"),
        Architecture("gemma2", "Gemma2", "attention logit softcapping; sliding and full layers alternate"),
        Architecture("gemma3_text", "Gemma3", "sliding and full layers (sliding ones dense), q/k norm"),
        Architecture("olmo", "OLMo", "non-parametric layer norm"),
        Architecture("olmo2", "OLMo2", "q/k RMSNorm over all heads"),
        Architecture("cohere", "Cohere", "interleaved RoPE pairs, parallel attention and MLP", "interleaved"),
        Architecture("cohere2", "Cohere2", "sliding layers (dense) with RoPE, full layers without RoPE", "none"),
        Architecture("granite", "Granite", "attention multiplier as the scaling"),
        Architecture("starcoder2", "StarCoder2", "biases, LayerNorm"),
        Architecture("glm", "GLM", "partial, interleaved RoPE", "interleaved"),
        Architecture("helium", "Helium", "interleaved RoPE", "interleaved"),
        Architecture("gpt_neox", "GPT-NeoX", "fused query_key_value projection, a quarter of the channels rotary"),
        Architecture("gpt_oss", "gpt-oss", "learned attention sinks (s_aux); sliding and full layers alternate"),
        Architecture("deepseek_v3", "DeepSeek-V3", "MLA: keys of 48 (32 no-RoPE + 16 RoPE) channels, values of 32"),
        Architecture("deepseek_v2", "DeepSeek-V2", "MLA with complex (interleaved) RoPE", "interleaved"),
        Architecture("glm4_moe_lite", "GLM-4-MoE-Lite", "MLA, mixture of experts"),
        Architecture("minicpm3", "MiniCPM3", "MLA, scaled embeddings and residuals"),
        Architecture("youtu", "Youtu", "MLA with DeepSeek-V3's interleaved RoPE weights"),
        Architecture("glm4", "GLM-4", "partial, interleaved RoPE; extra norms after attention and MLP", "interleaved"),
        Architecture("glm4_moe", "GLM-4-MoE", "partial rotary (rotate_half), mixture of experts"),
        Architecture("granitemoe", "GraniteMoE", "attention multiplier as the scaling, mixture of experts"),
        Architecture("olmo3", "OLMo3", "sliding and full layers, q/k norm"),
        Architecture(
            "exaone4", "EXAONE 4", "sliding and full layers, full ones without RoPE if windowed", "windowed-none"
        ),
        Architecture("ministral", "Ministral", "sliding and full layers"),
        Architecture(
            "smollm3", "SmolLM3", "layers without RoPE among layers with it (keep_rope_pairs refused)", "mixed"
        ),
        Architecture("vaultgemma", "VaultGemma", "softcapping like Gemma2, sliding and full layers"),
        Architecture("ernie4_5", "ERNIE 4.5", "interleaved RoPE", "interleaved"),
        Architecture("hunyuan_v1_dense", "Hunyuan-V1-Dense", "q/k norm after RoPE"),
        Architecture("seed_oss", "Seed-OSS", "attention biases"),
        Architecture("arcee", "Arcee", "ReLU-squared MLP, no gate"),
        Architecture("apertus", "Apertus", "q/k norm, xIELU MLP, Llama-3 RoPE scaling"),
    )
}


def tested_architecture(config: Any) -> Optional[Architecture]:
    """The matrix entry of a model's (text) config, or None where its type was not tested."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return TESTED.get(str(getattr(text, "model_type", "")))


def rope_pairs(config: Any, layout: HeadLayout) -> RopePairs:
    """Which channels of a post-RoPE key RoPE turns together; ValueError for a type outside the matrix."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    entry = tested_architecture(text)
    if entry is None:
        raise ValueError(
            f"keep_rope_pairs: doublesparse does not know how {getattr(text, 'model_type', type(config).__name__)!r} "
            "pairs the rotary channels of its keys (rotate_half or adjacent channels), so it cannot keep the pairs "
            "together: calibrate without keep_rope_pairs (--keep-rope-pairs)"
        )
    if entry.rope == "mixed":
        raise ValueError(
            f"keep_rope_pairs: {entry.name} applies RoPE on some layers only (config no_rope_layers), and a mask "
            "records one pairing for all layers: calibrate without keep_rope_pairs (--keep-rope-pairs)"
        )
    if entry.rope == "none" or (entry.rope == "windowed-none" and getattr(text, "sliding_window", None)):
        return RopePairs()
    if is_mla(text):
        return RopePairs(int(text.qk_rope_head_dim), int(text.qk_nope_head_dim), entry.rope == "interleaved")
    rotary = int(layout.head_dim * float(partial_rotary_factor(text)))
    return RopePairs(rotary - rotary % 2, 0, entry.rope == "interleaved")


def partial_rotary_factor(text: Any) -> float:
    """The share of a head's channels that RoPE turns (1.0 unless the config says less)."""
    rope = getattr(text, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    if factor is None:
        factor = getattr(text, "partial_rotary_factor", None) or 1.0
    return float(factor)
