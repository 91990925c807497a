"""ChannelMask: files, the authors' format, GQA reduction and validation."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from doublesparse import ChannelMask, HeadLayout
from doublesparse.channels import borda_reduce

AUTHORS_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "interop" / "authors-Llama-3.1-8B.json"


def random_mask(
    layout: HeadLayout, per_kv_head: bool = False, seed: int = 0, with_statistics: bool = True
) -> ChannelMask:
    generator = torch.Generator().manual_seed(seed)
    heads = layout.num_kv_heads if per_kv_head else layout.num_heads
    stats = {k: torch.rand(layout.num_layers, heads, layout.head_dim, generator=generator) for k in ("q", "k", "qk")}
    ranking = stats["qk"].argsort(dim=-1, descending=True)
    return ChannelMask(ranking, "qk", layout, per_kv_head, stats if with_statistics else {}, {"seed": seed})


LAYOUT = HeadLayout(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16, model_type="llama", name="tiny")


def test_save_load_round_trip(tmp_path):
    mask = random_mask(LAYOUT)
    mask.save(tmp_path / "m.safetensors")
    loaded = ChannelMask.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.ranking, mask.ranking)
    assert loaded.layout == mask.layout and loaded.kind == "qk" and loaded.per_kv_head is False
    assert loaded.calibration == {"seed": 0}
    for kind, stat in mask.statistics.items():
        assert torch.equal(loaded.statistics[kind], stat)
    assert torch.equal(ChannelMask.load(tmp_path / "m.safetensors", kind="k").ranking, mask.with_kind("k").ranking)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must not be left behind"


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import doublesparse.mask_files as mask_files

    def broken(tensors, path, metadata):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(mask_files, "save_file", broken)
    with pytest.raises(OSError):
        random_mask(LAYOUT).save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_authors_file_loads_and_validates_against_llama_3_1_8b_shape():
    if not AUTHORS_FILE.exists():
        pytest.skip("../shared/interop is not beside this checkout")
    config = LlamaConfig(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336
    )
    layout = HeadLayout.from_config(config)
    qk = ChannelMask.load(AUTHORS_FILE, layout=layout)
    assert qk.kind == "qk" and qk.ranking.shape == (32, 32, 128) and not qk.per_kv_head
    qk.validate(layout)
    k = ChannelMask.load(AUTHORS_FILE, kind="k", layout=layout)
    assert k.per_kv_head and k.ranking.shape == (32, 8, 128)
    k.validate(layout)
    reduced = qk.per_kv()
    assert reduced.ranking.shape == (32, 8, 128)
    reduced.check_rankings()
    # Without a layout the head counts are inferred from the q and k entries.
    assert ChannelMask.load(AUTHORS_FILE).layout.num_kv_heads == 8


def test_authors_json_export_round_trip(tmp_path):
    mask = random_mask(LAYOUT)
    mask.to_authors_json(tmp_path / "m.json")
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["model.layers.0.self_attn.qk_proj"]) == 8
    assert len(data["model.layers.0.self_attn.k_proj"]) == 2
    loaded = ChannelMask.load(tmp_path / "m.json", layout=LAYOUT)
    assert torch.equal(loaded.ranking, mask.ranking)


def test_borda_reduction_prefers_channels_ranked_high_by_the_whole_group():
    # Two query heads in one group: channel 3 is 1st and 2nd, channel 0 is 1st and last.
    ranking = torch.tensor([[[3, 0, 1, 2], [2, 3, 1, 0]]])
    assert borda_reduce(ranking, 2).tolist() == [[[3, 2, 0, 1]]]


def test_gqa_reduction_sums_statistics_when_present():
    mask = random_mask(LAYOUT)
    reduced = mask.per_kv()
    expected = mask.statistics["qk"].view(3, 2, 4, 16).sum(2).argsort(dim=-1, descending=True)
    assert torch.equal(reduced.ranking, expected)
    assert reduced.per_kv_head


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: r.__setitem__((0, 0, 0), 99), "range"),
        (lambda r: r.__setitem__((1, 2, 3), int(r[1, 2, 4])), "permutation"),
    ],
)
def test_bad_indices_are_rejected(corrupt, message):
    ranking = random_mask(LAYOUT).ranking.clone()
    corrupt(ranking)
    with pytest.raises(ValueError, match=message):
        ChannelMask(ranking, "qk", LAYOUT, per_kv_head=False)


@pytest.mark.parametrize(
    "other, message",
    [
        (HeadLayout(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=16), "layers"),
        (HeadLayout(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32), "head_dim"),
        (HeadLayout(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16), "query heads"),
    ],
)
def test_mask_for_another_model_is_rejected(other, message):
    with pytest.raises(ValueError, match=message):
        random_mask(LAYOUT).validate(other)


# --------------------------------------------------------------------------- content hash (pinning)


def _saved_with_statistics(tmp_path):
    from doublesparse.calibration import calibrate_blocks

    from tiny_models import tiny_model

    model = tiny_model("llama")
    mask = calibrate_blocks(
        model, torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0)), progress=False
    )
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    return mask, path


def test_saved_mask_carries_its_content_hash_and_load_verifies_it(tmp_path):
    from safetensors import safe_open

    mask, path = _saved_with_statistics(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata()["content_sha256"]
    assert stored == mask.content_hash() and len(stored) == 64
    loaded = ChannelMask.load(path)
    assert loaded.source_hash == stored and loaded.source_hash_note.startswith("verified")
    # A view (another kind) keeps the file's hash on the loaded object.
    assert ChannelMask.load(path, kind="k").source_hash == stored


def _tamper(path, name, swap):
    """Change the bytes of tensor `name` in place, keeping the file loadable."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    begin, _ = header[name]["data_offsets"]
    start = 8 + size + begin
    swap(data, start)
    path.write_bytes(bytes(data))


def test_a_changed_ranking_or_statistic_is_refused_naming_the_file(tmp_path):
    _, path = _saved_with_statistics(tmp_path)
    original = path.read_bytes()

    def swap_first_two_channels(data, start):  # still a permutation: only the hash can tell
        data[start : start + 4], data[start + 4 : start + 8] = data[start + 4 : start + 8], data[start : start + 4]

    _tamper(path, "ranking", swap_first_two_channels)
    with pytest.raises(ValueError, match=r"mask\.safetensors.*changed after it was written"):
        ChannelMask.load(path)
    path.write_bytes(original)

    def nudge_a_float(data, start):
        data[start] ^= 1

    _tamper(path, "statistics.qk", nudge_a_float)
    with pytest.raises(ValueError, match="sha256"):
        ChannelMask.load(path)


def test_files_without_a_hash_load_with_it_computed(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    mask, path = _saved_with_statistics(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    del metadata["content_sha256"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    loaded = ChannelMask.load(old)
    assert loaded.source_hash == mask.content_hash()
    assert "carries no hash" in loaded.source_hash_note
    assert torch.equal(loaded.ranking, mask.ranking)


def test_content_hash_covers_names_dtypes_shapes_and_bytes():
    from doublesparse.channels import content_hash

    a = {"ranking": torch.arange(4, dtype=torch.int32).view(1, 1, 4)}
    assert content_hash(a) == content_hash({"ranking": a["ranking"].clone()})
    assert content_hash(a) != content_hash({"ranking": a["ranking"].view(1, 4, 1)})
    assert content_hash(a) != content_hash({"ranking": a["ranking"].to(torch.int64)})
    assert content_hash(a) != content_hash({"other": a["ranking"]})
