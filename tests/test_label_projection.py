"""Low-rank projection labels: the calibrated maps are exact at full rank and their truncations are the best rank-r
approximation; labels and query labels agree on every backend; the mask file stores them (format 2) and still reads
format-1 files; at full rank they score exactly; a patched model decodes with them alike on every backend."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import doublesparse as ds
from doublesparse.calibration import calibrate_blocks
from doublesparse.calibration.projection import label_maps
from doublesparse.channels import ChannelMask
from doublesparse.kernels import dispatch
from doublesparse.kernels.label_projection import KeyProjection, project_keys, query_labels
from doublesparse.kernels.native import native_available

from tiny_models import tiny_model


def _moments(generator, heads=3, dim=16, tokens=4000):
    mixing = torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64)
    samples = torch.randn(heads, tokens, dim, generator=generator, dtype=torch.float64) @ mixing
    return samples, samples.transpose(1, 2) @ samples / tokens


def test_full_rank_maps_keep_every_dot_product_exactly():
    generator = torch.Generator().manual_seed(0)
    queries, query_moment = _moments(generator)
    keys, key_moment = _moments(generator)
    key_map, query_map = label_maps(query_moment, key_moment)
    exact = queries @ keys.transpose(1, 2)
    through_labels = (queries @ query_map) @ (keys @ key_map).transpose(1, 2)
    assert torch.allclose(through_labels, exact, rtol=1e-8, atol=1e-8)


def test_rank_r_maps_beat_channel_subsets_and_improve_with_rank():
    generator = torch.Generator().manual_seed(1)
    queries, query_moment = _moments(generator, heads=1)
    keys, key_moment = _moments(generator, heads=1)
    key_map, query_map = label_maps(query_moment, key_moment)
    exact = queries[0] @ keys[0].T
    errors = []
    for rank in (2, 4, 8):
        approx = (queries[0] @ query_map[0, :, :rank]) @ (keys[0] @ key_map[0, :, :rank]).T
        errors.append(float((approx - exact).pow(2).mean()))
        statistic = (queries[0].abs() * keys[0].abs()).mean(0)  # the qk channel statistic, top `rank` channels
        top = statistic.argsort(descending=True)[:rank]
        channel_error = float((queries[0][:, top] @ keys[0][:, top].T - exact).pow(2).mean())
        assert errors[-1] < channel_error
    assert errors[0] > errors[1] > errors[2]


def _projection(generator, label_heads=2, dim=32, rank=8):
    key = torch.randn(label_heads, dim, rank, generator=generator)
    query = torch.randn(label_heads, dim, rank, generator=generator)
    return KeyProjection(key, query)


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_projected_labels_agree_on_every_backend(bits, backend):
    if backend == "cpu" and not native_available():
        pytest.skip("no C compiler for the native kernels")
    generator = torch.Generator().manual_seed(bits)
    projection = _projection(generator)
    keys = torch.randn(2, 2, 37, 32, generator=generator)
    expected = dispatch.make_labels(project_keys(keys, projection), projection.identity_channels(), bits, "torch")
    got = dispatch.make_labels(keys, projection, bits, backend)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    if bits == 16:  # 16-bit labels are the projected keys themselves, in fp16
        assert torch.allclose(got.codes.float(), torch.einsum("bhtd,hdr->bhtr", keys, projection.key), atol=1e-2)
    query = torch.randn(2, 6, 3, 32, generator=generator)  # 3 query heads per label head
    q_labels = query_labels(query, projection)
    assert torch.allclose(
        q_labels, torch.einsum("bhld,hdr->bhlr", query, projection.query.repeat_interleave(3, 0)), atol=1e-5
    )
    scores = dispatch.label_scores(q_labels, got, bits, 0.125, 2, backend)
    reference = dispatch.label_scores(q_labels, expected, bits, 0.125, 2, "torch")
    assert torch.allclose(scores, reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2)
    blocks = torch.randint(3, 128, (6, 96), generator=torch.Generator().manual_seed(0))
    return model, calibrate_blocks(model, blocks, progress=False)


def test_the_mask_file_stores_projections_and_reads_format_1(calibrated, tmp_path):
    _, mask = calibrated
    assert mask.projection["key"].shape == (2, 2, 16, 16)
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "2"
    loaded = ChannelMask.load(path)
    for side in ("key", "query"):
        assert torch.equal(loaded.projection[side], mask.projection[side])
    key, query = loaded.projection_tables(4)
    assert key.shape == query.shape == (2, 2, 16, 4)
    # A format-1 file (no projections), as the previous version wrote it, still loads.
    old = ChannelMask(mask.ranking, mask.kind, mask.layout, mask.per_kv_head, mask.statistics, mask.calibration)
    _rewrite_version(old, tmp_path / "old.safetensors", "1")
    assert ChannelMask.load(tmp_path / "old.safetensors").projection == {}
    with pytest.raises(ValueError, match="holds no label projections"):
        ChannelMask.load(tmp_path / "old.safetensors").projection_tables(4)
    _rewrite_version(old, tmp_path / "future.safetensors", "9")
    with pytest.raises(ValueError, match="format version '9'"):
        ChannelMask.load(tmp_path / "future.safetensors")


def _rewrite_version(mask: ChannelMask, path, version: str) -> None:
    from safetensors.torch import load_file, save_file

    mask.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": version})


def test_projection_labels_are_refused_where_they_do_not_apply(calibrated):
    model, mask = calibrated
    with pytest.raises(ValueError, match="selection='group'"):
        ds.SparsityConfig(labels="projection", selection="head", label_bits=16, sink_tokens=0, recent_tokens=0)
    with pytest.raises(ValueError, match="labels"):
        ds.SparsityConfig(labels="lowrank", label_bits=16, sink_tokens=0, recent_tokens=0)
    without = ChannelMask(mask.ranking, mask.kind, mask.layout, mask.per_kv_head, mask.statistics)
    with pytest.raises(ValueError, match="holds no label projections"):
        ds.apply(
            model,
            without,
            ds.SparsityConfig(num_channels=8, labels="projection", label_bits=16, sink_tokens=0, recent_tokens=0),
        )
    assert not ds.is_patched(model)
    with pytest.raises(ValueError, match="ranks 1..16"):
        mask.projection_tables(17)


def _decode_logits(model, mask, config, prompt, steps=6):
    with torch.no_grad(), ds.patched(model, mask, config):
        out = model(input_ids=prompt, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        token = logits[-1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
    return torch.cat(logits)


@pytest.mark.parametrize("bits", [16, 4])
def test_a_patched_model_decodes_with_projection_labels_alike_on_every_backend(calibrated, bits):
    model, mask = calibrated
    prompt = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(2))
    config = ds.SparsityConfig(
        num_channels=8, token_budget=1 / 8, label_bits=bits, labels="projection", sink_tokens=0, recent_tokens=0
    )
    backends = ["torch", "triton"] + (["cpu"] if native_available() else [])
    results = {b: _decode_logits(model, mask, config.replace(backend=b), prompt) for b in backends}
    for backend in backends[1:]:
        assert torch.allclose(results[backend], results["torch"], atol=1e-4), backend
    channels = _decode_logits(model, mask, config.replace(labels="channels", backend="torch"), prompt)
    assert not torch.allclose(channels, results["torch"], atol=1e-4)  # the projection is really used


def test_full_rank_calibrated_projection_labels_score_exactly(calibrated):
    _, mask = calibrated
    key, query = mask.projection_tables(16)
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 50, 16, generator=generator)
    queries = torch.randn(1, 4, 1, 16, generator=generator)
    exact = torch.matmul(queries, keys.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.25
    for layer in range(2):
        projection = KeyProjection(key[layer], query[layer])
        labels = dispatch.make_labels(keys, projection, 16, "torch")
        scores = dispatch.label_scores(query_labels(queries, projection), labels, 16, 0.25, 4, "torch")
        assert torch.allclose(scores, exact, rtol=1e-2, atol=1e-2)  # fp16 labels; exact in exact arithmetic


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rope_averaged_moments_equal_the_mean_over_transformers_rotations(rotary_fraction):
    from transformers.models.llama.modeling_llama import rotate_half

    from doublesparse.calibration.projection import rope_averaged

    dim, positions = 16, 37
    rotary = int(dim * rotary_fraction)
    generator = torch.Generator().manual_seed(4)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary))
    samples = torch.randn(50, dim, generator=generator, dtype=torch.float64) @ torch.randn(
        dim, dim, generator=generator, dtype=torch.float64
    )
    moment = samples.T @ samples / 50
    expected = torch.zeros(dim, dim, dtype=torch.float64)
    for position in range(positions):
        angles = torch.cat([position * inv_freq, position * inv_freq])
        turned = samples.clone()  # transformers' RoPE: x * cos + rotate_half(x) * sin on the rotary channels
        part = samples[:, :rotary]
        turned[:, :rotary] = part * angles.cos() + rotate_half(part) * angles.sin()
        expected += turned.T @ turned / 50 / positions
    assert torch.allclose(rope_averaged(moment, inv_freq, positions), expected, atol=1e-10)


def test_calibration_averages_projection_moments_over_the_model_context(calibrated):
    model, mask = calibrated
    assert mask.calibration["projection_rope_positions"] == model.config.max_position_embeddings
    blocks = torch.randint(3, 128, (6, 96), generator=torch.Generator().manual_seed(0))
    short = calibrate_blocks(model, blocks, progress=False, projection_positions=96)
    assert short.calibration["projection_rope_positions"] == 96
    assert not torch.allclose(short.projection["key"], mask.projection["key"])
    with pytest.raises(ValueError, match="projection_positions"):
        calibrate_blocks(model, blocks, progress=False, projection_positions=0)
