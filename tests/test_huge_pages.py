"""Host tensors on huge pages (doublesparse/huge_pages.py): copies equal their source, memory is asked for
huge pages aligned to them before its first touch, and nothing is asked where the system cannot give them."""

from pathlib import Path

import pytest
import torch

import doublesparse.huge_pages as huge_pages
from doublesparse.cache import StaticDoubleSparseCache
from doublesparse.huge_pages import HUGE_PAGE, MIN_BYTES, huge_page_zeros, module_on_huge_pages, on_huge_pages

from tiny_models import tiny_config

LARGE = (MIN_BYTES // 4 + 1000,)  # float32 elements: just over the size that gets advice


@pytest.fixture
def advised(monkeypatch):
    """Record every madvise call and let it succeed, in a THP mode that takes advice."""
    calls = []

    def record(address, length):
        calls.append((address, length))
        return True

    monkeypatch.setattr(huge_pages, "huge_page_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages, "_madvise", record)
    return calls


def _covers(calls, tensor):
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return any(
        a % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and a <= start and end <= a + length for a, length in calls
    )


def test_a_large_copy_is_equal_aligned_and_advised_before_it_is_written(advised):
    source = torch.randn(LARGE)
    copy = on_huge_pages(source)
    assert copy is not source and torch.equal(copy, source) and copy.is_contiguous()
    assert copy.data_ptr() % HUGE_PAGE == 0 and _covers(advised, copy)


def test_strided_and_half_precision_tensors_copy_exactly(advised):
    source = torch.randn(2, MIN_BYTES // 8 + 64).to(torch.bfloat16).t()  # non-contiguous
    copy = on_huge_pages(source)
    assert copy.shape == source.shape and copy.dtype == torch.bfloat16 and torch.equal(copy, source)


@pytest.mark.parametrize("mode", ["never", "unavailable"])
def test_nothing_is_asked_where_the_system_gives_no_huge_pages(monkeypatch, mode):
    calls = []
    monkeypatch.setattr(huge_pages, "huge_page_mode", lambda: mode)
    monkeypatch.setattr(huge_pages, "_madvise", lambda *a: calls.append(a) or True)
    source = torch.randn(LARGE)
    assert on_huge_pages(source) is source and calls == []
    zeros = huge_page_zeros(LARGE, torch.float32)
    assert zeros.shape == LARGE and not zeros.any() and calls == []


def test_small_tensors_and_refused_advice_leave_the_tensor_as_it_is(advised, monkeypatch):
    small = torch.randn(100)
    assert on_huge_pages(small) is small and advised == []
    monkeypatch.setattr(huge_pages, "_madvise", lambda *a: False)
    large = torch.randn(LARGE)
    assert on_huge_pages(large) is large


def test_zeros_are_zero_of_the_shape_and_dtype_asked(advised):
    zeros = huge_page_zeros((3, MIN_BYTES // 6 + 8), torch.float16)
    assert zeros.shape == (3, MIN_BYTES // 6 + 8) and zeros.dtype == torch.float16 and not zeros.any()
    assert zeros.data_ptr() % HUGE_PAGE == 0 and _covers(advised, zeros)


def test_moving_a_module_keeps_its_values_and_tied_weights_tied(advised):
    embedding = torch.nn.Embedding(MIN_BYTES // (4 * 64) + 8, 64)
    head = torch.nn.Linear(64, embedding.num_embeddings, bias=False)
    head.weight = embedding.weight  # tied, as many language models are
    model = torch.nn.ModuleDict({"embed": embedding, "head": head, "norm": torch.nn.LayerNorm(64)})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    moved = module_on_huge_pages(model)
    assert moved == embedding.weight.numel() * 4  # once, and the small norm not at all
    assert head.weight is embedding.weight and embedding.weight.data_ptr() % HUGE_PAGE == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_static_label_cache_keeps_its_cpu_buffers_on_advised_pages(advised):
    config = tiny_config("llama")
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    tokens = MIN_BYTES // (4 * kv_heads * head_dim) + 16
    channels = {i: torch.arange(4).repeat(kv_heads, 1) for i in range(config.num_hidden_layers)}
    cache = StaticDoubleSparseCache(config, tokens, channels, label_bits=4)
    keys = torch.randn(1, kv_heads, 3, head_dim)
    out_keys, out_values = cache.update(keys, keys + 1, 0)
    layer = cache.layers[0]
    assert layer.keys.data_ptr() % HUGE_PAGE == 0 and _covers(advised, layer.keys) and _covers(advised, layer.values)
    assert torch.equal(out_keys[:, :, :3], keys) and torch.equal(out_values[:, :, :3], keys + 1)
    assert not out_keys[:, :, 3:].any() and not out_values[:, :, 3:].any()


def test_the_mode_is_one_the_kernel_names_and_the_process_bytes_are_counted():
    assert huge_pages.huge_page_mode() in ("always", "madvise", "never", "unavailable")
    counted = huge_pages.process_huge_page_bytes()
    if Path("/proc/self/smaps_rollup").exists():  # Linux: the line is always there, 0 kB or more
        assert isinstance(counted, int) and counted >= 0
    else:
        assert counted is None
