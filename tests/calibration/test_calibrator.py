"""Calibration: planted outlier channels are found, accumulation is order-free, files are reproducible and atomic."""

import pytest
import torch

import doublesparse as ds
from doublesparse.calibration import calibrate, calibrate_blocks
from doublesparse.calibration.capture import RECORDER_ATTRIBUTE
from doublesparse.calibration.statistics import ChannelStatistics
from doublesparse.channels import ChannelMask
from doublesparse.ranking import RopePairs
from doublesparse.support import attention_modules

from tiny_models import ARCHITECTURES, tiny_model
from tiny_tokenizer import sample_texts, tiny_tokenizer

HEAD_DIM = 16


def random_blocks(count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (count, length), generator=generator)


def plant_outliers(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Scale q_proj/k_proj rows of two RoPE pairs per KV group; return the planted channels [L, H_q, 4], sorted."""
    layout = ds.HeadLayout.from_config(model.config)
    group, half = layout.group_size, layout.head_dim // 2
    generator = torch.Generator().manual_seed(seed)
    planted = torch.empty(layout.num_layers, layout.num_heads, 4, dtype=torch.long)
    with torch.no_grad():
        for layer, module in enumerate(attention_modules(model, layout)):
            for kv in range(layout.num_kv_heads):
                low = torch.randperm(half, generator=generator)[:2]
                channels = torch.cat([low, low + half]).sort().values
                module.k_proj.weight[kv * layout.head_dim + channels] *= 30
                for head in range(kv * group, (kv + 1) * group):
                    module.q_proj.weight[head * layout.head_dim + channels] *= 30
                    planted[layer, head] = channels
    return planted


def assert_same_ranking_up_to_ties(reference: ChannelMask, other: ChannelMask) -> None:
    stat = reference.statistics[reference.kind]
    assert torch.allclose(stat.gather(-1, other.ranking), stat.gather(-1, reference.ranking), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["q", "k", "qk"])
def test_planted_outlier_channels_rank_first(kind, num_kv_heads):
    model = tiny_model("llama", num_kv_heads=num_kv_heads)
    planted = plant_outliers(model)
    mask = calibrate_blocks(model, random_blocks(4, 48), kind=kind, progress=False)
    assert mask.kind == kind and not mask.per_kv_head
    assert torch.equal(mask.ranking[..., :4].sort(dim=-1).values, planted)
    # The KV view (statistics summed over a group) finds them too.
    kv_planted = planted[:, :: model.config.num_attention_heads // num_kv_heads]
    assert torch.equal(mask.per_kv().ranking[..., :4].sort(dim=-1).values, kv_planted)


def test_planted_outliers_found_in_bf16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    planted = plant_outliers(model)
    mask = calibrate_blocks(model, random_blocks(4, 48), progress=False)
    assert all(stat.dtype == torch.float32 and torch.isfinite(stat).all() for stat in mask.statistics.values())
    assert torch.equal(mask.ranking[..., :4].sort(dim=-1).values, planted)
    assert mask.calibration["dtype"] == "bfloat16"


def test_rope_pairs_rank_together():
    model = tiny_model("llama")
    planted = plant_outliers(model)
    mask = calibrate_blocks(model, random_blocks(4, 48), keep_rope_pairs=True, progress=False)
    pairs = mask.ranking.view(*mask.ranking.shape[:-1], HEAD_DIM // 2, 2)
    assert torch.equal((pairs[..., 0] - pairs[..., 1]).abs(), torch.full(pairs.shape[:-1], HEAD_DIM // 2))
    assert torch.equal(mask.ranking[..., :4].sort(dim=-1).values, planted)
    assert mask.calibration["keep_rope_pairs"] and mask.calibration["rope_pair_dim"] == HEAD_DIM
    # Pairs survive the reductions that re-rank from statistics.
    for derived in (mask.per_kv(), mask.with_kind("k")):
        pairs = derived.ranking.view(*derived.ranking.shape[:-1], HEAD_DIM // 2, 2)
        assert bool(((pairs[..., 0] - pairs[..., 1]).abs() == HEAD_DIM // 2).all())


def plant_mla_outliers(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """In a DeepSeek-V3, scale two no-RoPE channels of every head and one RoPE pair of every layer by 30.

    The no-RoPE key channels are rows of kv_b_proj (per head), the RoPE key is shared by the heads (rows of
    kv_a_proj_with_mqa after the latent); the query rows of q_b_proj are scaled alike. With rope_interleave
    the weights pair rows 2i and 2i + 1, which the model rotates into post-RoPE channels nope + i and
    nope + i + rope / 2. Returns the planted post-RoPE key channels [L, H, 4], sorted.
    """
    config = model.config
    nope, rope, value = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    layout = ds.HeadLayout.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    planted = torch.empty(layout.num_layers, layout.num_heads, 4, dtype=torch.long)
    with torch.no_grad():
        for layer, module in enumerate(attention_modules(model, layout)):
            pair = int(torch.randint(0, rope // 2, (1,), generator=generator))
            rows = [2 * pair, 2 * pair + 1] if config.rope_interleave else [pair, pair + rope // 2]
            module.kv_a_proj_with_mqa.weight[[config.kv_lora_rank + row for row in rows]] *= 30
            for head in range(layout.num_heads):
                no_rope = torch.randperm(nope, generator=generator)[:2]
                module.kv_b_proj.weight[head * (nope + value) + no_rope] *= 30
                module.q_b_proj.weight[head * layout.head_dim + no_rope] *= 30
                module.q_b_proj.weight[[head * layout.head_dim + nope + row for row in rows]] *= 30
                rotary = torch.tensor([nope + pair, nope + pair + rope // 2])
                planted[layer, head] = torch.cat([no_rope, rotary]).sort().values
    return planted


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("kind", ["q", "k", "qk"])
def test_mla_outliers_planted_in_both_key_parts_rank_first(kind, rope_interleave):
    model = tiny_model("deepseek_v3", rope_interleave=rope_interleave)
    planted = plant_mla_outliers(model)
    mask = calibrate_blocks(model, random_blocks(4, 48), kind=kind, progress=False)
    assert mask.ranking.shape == (2, 4, 48)
    assert torch.equal(mask.ranking[..., :4].sort(dim=-1).values, planted)
    # Kept as pairs, the RoPE pair (in the post-RoPE key's last 16 channels, rotate_half) ranks as one unit.
    paired = calibrate_blocks(model, random_blocks(4, 48), kind=kind, keep_rope_pairs=True, progress=False)
    assert paired.rope_pairs == RopePairs(dim=16, offset=32)
    assert torch.equal(paired.ranking[..., :4].sort(dim=-1).values, planted)
    for row in paired.ranking.view(-1, 48).tolist():
        at = {channel: position for position, channel in enumerate(row)}
        assert all(abs(at[32 + i] - at[40 + i]) == 1 for i in range(8)), "a RoPE pair split up"


@pytest.mark.parametrize("arch", ["llama", "gpt_oss", "gemma2", "deepseek_v3"])
def test_statistics_match_a_direct_computation(arch):
    # The q and k of every layer as the unpatched model computes them (its own eager attention: gpt-oss's
    # sinks and Gemma2's softcap shape what the layers after the first see); MLA's keys of 48 channels.
    import sys

    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    model = tiny_model(arch)
    blocks = random_blocks(3, 20)
    mask = calibrate_blocks(model, blocks, batch_size=2, progress=False)
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query.clone(), key.clone())
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_record_qk", record)
    AttentionMaskInterface.register("test_record_qk", eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_record_qk")
    with torch.no_grad():
        model(blocks)
    model.set_attn_implementation(previous)
    for layer, (query, key) in seen.items():
        group = query.shape[1] // key.shape[1]
        key_per_query = key.repeat_interleave(group, dim=1)
        assert torch.allclose(mask.statistics["qk"][layer], (query * key_per_query).abs().mean(dim=(0, 2)), rtol=1e-5)
        assert torch.allclose(mask.statistics["q"][layer], query.abs().mean(dim=(0, 2)), rtol=1e-5)
        assert torch.allclose(mask.statistics["k"][layer], key_per_query.abs().mean(dim=(0, 2)), rtol=1e-5)
    assert sorted(seen) == [0, 1]
    assert mask.calibration["tokens"] == blocks.numel()


def test_order_and_batching_do_not_change_the_result():
    model = tiny_model("qwen2")
    blocks = random_blocks(6, 24)
    reference = calibrate_blocks(model, blocks, batch_size=6, progress=False)
    shuffled = calibrate_blocks(model, blocks[torch.tensor([4, 1, 5, 0, 3, 2])], batch_size=4, progress=False)
    one_by_one = calibrate_blocks(model, blocks, batch_size=1, progress=False)
    for other in (shuffled, one_by_one):
        for kind in ("q", "k", "qk"):
            assert torch.allclose(other.statistics[kind], reference.statistics[kind], rtol=1e-5, atol=1e-7)
        assert_same_ranking_up_to_ties(reference, other)
        assert other.calibration["tokens"] == reference.calibration["tokens"] == blocks.numel()


def test_padding_is_excluded():
    model = tiny_model("llama")
    full, short = random_blocks(1, 32, seed=1), random_blocks(1, 20, seed=2)
    padded = torch.cat([short, torch.zeros(1, 12, dtype=torch.long)], dim=1)
    attention_mask = torch.cat([torch.ones(1, 32), torch.cat([torch.ones(1, 20), torch.zeros(1, 12)], dim=1)]).long()
    both = calibrate_blocks(model, torch.cat([full, padded]), attention_mask, progress=False)
    alone_full = calibrate_blocks(model, full, progress=False)
    alone_short = calibrate_blocks(model, short, progress=False)
    assert both.calibration["tokens"] == 52
    for kind in ("q", "k", "qk"):
        expected = (32 * alone_full.statistics[kind] + 20 * alone_short.statistics[kind]) / 52
        assert torch.allclose(both.statistics[kind], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
def test_forward_unchanged_and_attention_restored(previous):
    model = tiny_model("mistral", attn_implementation=previous)
    blocks = random_blocks(2, 16)
    with torch.no_grad():
        before = model(blocks).logits
    model.train()
    calibrate_blocks(model, blocks, progress=False)
    assert model.config._attn_implementation == previous and model.training
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(blocks).logits, before, atol=1e-5)


def test_capture_output_equals_sdpa():
    model = tiny_model("phi3")
    blocks = random_blocks(2, 16)
    outputs = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output.logits.clone()))
    try:
        calibrate_blocks(model, blocks, batch_size=2, progress=False)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.allclose(outputs[0], model(blocks).logits[:, -1:], atol=1e-5)


def test_model_restored_when_calibration_fails(monkeypatch):
    model = tiny_model("llama")

    def fail(self, layer, query, key):
        raise RuntimeError("boom")

    monkeypatch.setattr(ChannelStatistics, "add", fail)
    with pytest.raises(RuntimeError, match="boom"):
        calibrate_blocks(model, random_blocks(2, 16), progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, RECORDER_ATTRIBUTE) for m in model.modules())


def test_same_seed_same_bytes_different_seed_different_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    tokenizer, texts = tiny_tokenizer(), sample_texts(12)
    paths = []
    for run, seed in enumerate((0, 0, 1)):
        model = tiny_model("llama")
        mask = calibrate(model, tokenizer, texts, num_samples=6, seq_len=32, seed=seed, batch_size=4, progress=False)
        paths.append(tmp_path / f"run{run}.safetensors")
        mask.save(paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    loaded = ChannelMask.load(paths[0])
    assert loaded.calibration["time"] == "2023-11-14T22:13:20+00:00"
    assert {"source", "num_samples", "seq_len", "seed", "tokens", "kind", "keep_rope_pairs", "versions"} <= set(
        loaded.calibration
    )
    assert loaded.calibration["tokens"] == 6 * 32 and loaded.calibration["seed"] == 0


def test_interrupted_write_leaves_no_half_file(tmp_path, monkeypatch):
    import doublesparse.mask_files as mask_files

    mask = calibrate_blocks(tiny_model("llama"), random_blocks(2, 16), progress=False)
    path = tmp_path / "channels.safetensors"
    mask.save(path)
    good = path.read_bytes()
    fresh = tmp_path / "fresh.safetensors"

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(good[: len(good) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(mask_files, "save_file", half_then_fail)
    for target in (path, fresh):
        with pytest.raises(OSError, match="disk full"):
            mask.save(target)
    assert path.read_bytes() == good
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["channels.safetensors"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_then_apply(arch, tmp_path):
    model = tiny_model(arch)
    tokenizer = tiny_tokenizer()
    mask = calibrate(model, tokenizer, sample_texts(6), num_samples=3, seq_len=24, progress=False)
    path = tmp_path / "channels.safetensors"
    mask.save(path)
    loaded = ChannelMask.load(path)
    assert torch.equal(loaded.ranking, mask.ranking)
    assert all(torch.equal(loaded.statistics[k], mask.statistics[k]) for k in ("q", "k", "qk"))
    assert loaded.calibration == mask.calibration

    json_path = tmp_path / "channels.json"
    loaded.to_authors_json(json_path)
    from_json = ChannelMask.load(json_path, layout=loaded.layout)
    assert torch.equal(from_json.ranking, mask.ranking) and from_json.per_kv_head == mask.per_kv_head

    prompt = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    config = ds.SparsityConfig(num_channels=4, token_budget=8, label_bits=16, sink_tokens=0, recent_tokens=0)
    with ds.patched(model, path, config):
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 27)


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_bad_input_fails_before_any_work():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    calls = _count_forwards(model)
    cases = [
        (dict(texts=[]), "empty"),
        (dict(texts=["", "  \n"]), "empty"),
        (dict(texts=["too short"]), "fewer than one block"),
        (dict(texts="one string"), "single string"),
        (dict(texts=sample_texts(2), kind="v"), "kind"),
        (dict(texts=sample_texts(2), num_samples=0), "num_samples"),
        (dict(texts=sample_texts(2), seq_len=1), "seq_len"),
        (dict(texts=sample_texts(2), batch_size=0), "batch_size"),
    ]
    for kwargs, message in cases:
        texts = kwargs.pop("texts")
        with pytest.raises(ValueError, match=message):
            calibrate(model, tokenizer, texts, seq_len=kwargs.pop("seq_len", 512), progress=False, **kwargs)
    with pytest.raises(ValueError, match="vocabulary"):
        calibrate_blocks(model, torch.full((1, 8), 500), progress=False)
    assert calls == []


def test_unsupported_or_patched_model_fails_before_any_work():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    calls = _count_forwards(model)
    model._supports_attention_backend = False
    with pytest.raises(ValueError, match="attention interface"):
        calibrate(model, tokenizer, sample_texts(4), num_samples=2, seq_len=16, progress=False)
    with pytest.raises(ValueError, match="transformers model"):
        calibrate(torch.nn.Linear(2, 2), tokenizer, sample_texts(4), num_samples=2, seq_len=16, progress=False)
    del model._supports_attention_backend
    mask = ChannelMask(
        torch.arange(HEAD_DIM).expand(2, 4, HEAD_DIM), "qk", ds.HeadLayout.from_config(model.config), False
    )
    with ds.patched(model, mask, ds.SparsityConfig(num_channels=4, label_bits=16, sink_tokens=0, recent_tokens=0)):
        with pytest.raises(ValueError, match="remove"):
            calibrate(model, tokenizer, sample_texts(4), num_samples=2, seq_len=16, progress=False)
    assert calls == []


def test_fewer_blocks_than_asked_uses_all(caplog):
    mask = calibrate(
        tiny_model("llama"), tiny_tokenizer(), sample_texts(2), num_samples=1000, seq_len=64, progress=False
    )
    assert 1 <= mask.calibration["num_samples"] < 1000
    assert "fewer than" in caplog.text


def test_package_exports():
    import doublesparse.calibration as calibration

    assert callable(calibration.calibrate) and calibration.calibrate.__name__ == "calibrate"
    from doublesparse.calibration import calibrate as imported

    assert imported is calibration.calibrate
    with pytest.raises(AttributeError):
        _ = calibration.no_such_thing


def test_top_level_lazy_attribute():
    import doublesparse
    import doublesparse.calibration

    assert doublesparse.calibrate is doublesparse.calibration.calibrate


def test_progress_bar_on_stderr(capsys):
    calibrate_blocks(tiny_model("llama"), random_blocks(2, 16), batch_size=1)
    assert "calibrating" in capsys.readouterr().err
