"""Learned sinks (gpt-oss), softcapping (Gemma2) and multi-head latent attention (DeepSeek) on every path.

test_architectures.py proves each family exact on the growing label cache with the default backend. Here
the families whose attention differs from Llama's go through the other paths: each kernel backend (torch,
the native CPU kernels, which hand these calls to the torch reference, and Triton under its interpreter),
the preallocated (static) cache and the StaticDecoder loop, simulate mode, offload (exact selection, and
with prefetching), and the evaluation baselines' shared attention.
"""

import pytest
import torch

import doublesparse as ds
from doublesparse.decode import StaticDecoder
from doublesparse.eval.methods import make_method
from doublesparse.kernels import native

from tiny_models import left_padded_batch, random_channel_mask, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = ("gpt_oss", "gemma2", "deepseek_v3", "deepseek_v2")
NOT_MLA = ("gpt_oss", "gemma2")
SMALL = ds.SparsityConfig(num_channels=4, token_budget=5, label_bits=8, sink_tokens=1, recent_tokens=2)
TOLERANCE = 1e-5


def decode(model, config, *, steps=4, lengths=(12, 9), cache=None, mask=None, **options):
    """Greedy generation of `steps` tokens under `config`: (sequences, logits [steps, B, V], cache).

    The pad token (a zero embedding: a query that ties every key) is never generated, see test_architectures.py.
    """
    input_ids, attention_mask = left_padded_batch(list(lengths), seed=2)
    mask = random_channel_mask(model, seed=1) if mask is None else mask
    with torch.no_grad(), ds.patched(model, mask, config):
        if cache is not None:
            options["past_key_values"] = ds.make_cache(model, **cache)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, output_logits=True, return_dict_in_generate=True, suppress_tokens=[0], **options,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits), out.past_key_values


def assert_same(first, second, tolerance=TOLERANCE):
    assert torch.equal(first[0], second[0])
    assert float((first[1] - second[1]).abs().max()) <= tolerance


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.slow)]
if native.native_available():
    BACKENDS.insert(1, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", SPECIAL)
def test_every_backend_decodes_alike(arch, backend):
    model = tiny_model(arch)
    expected = decode(model, SMALL.replace(backend="torch"))
    assert_same(decode(model, SMALL.replace(backend=backend)), expected)


def argmax_decode(model, input_ids, attention_mask, cache, steps):
    """Greedy decoding by hand (no end-of-sequence rule): the tokens [B, steps] and their logits [B, steps, V]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens[-1])], dim=1)
        out = model(input_ids=tokens[-1], attention_mask=attention_mask, past_key_values=cache)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


@pytest.mark.parametrize("arch", SPECIAL)
def test_the_static_cache_and_decoder_decode_like_the_growing_cache(arch):
    model = tiny_model(arch)
    growing = decode(model, SMALL)
    static = decode(model, SMALL, cache_implementation="static")
    assert isinstance(static[2], ds.StaticDoubleSparseCache)
    assert_same(static, growing)
    # No padding: the hand-written loop passes no position ids.
    input_ids, attention_mask = left_padded_batch([12, 12], seed=2)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model, seed=1), SMALL):
        tokens, logits = argmax_decode(model, input_ids, attention_mask, ds.make_cache(model), 4)
        result = StaticDecoder(model, max_cache_len=24).generate(input_ids, attention_mask, 4, keep_logits=True)
    assert torch.equal(result.tokens, tokens)
    assert float((result.logits - logits).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("arch", SPECIAL)
def test_simulate_rows_equal_token_by_token_decoding(arch):
    model = tiny_model(arch)
    input_ids, attention_mask = left_padded_batch([14, 10], seed=3)
    mask = random_channel_mask(model, seed=4)
    with torch.no_grad():
        dense = model(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad(), ds.patched(model, mask, SMALL.replace(simulate=True)):
        simulated = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        cache = ds.make_cache(model)
        stepwise = torch.stack(
            [
                model(
                    input_ids=input_ids[:, position : position + 1],
                    attention_mask=attention_mask[:, : position + 1],
                    past_key_values=cache,
                ).logits[:, 0]
                for position in range(input_ids.shape[1])
            ],
            dim=1,
        )
    real = attention_mask.bool()
    assert float((simulated - stepwise)[real].abs().max()) <= TOLERANCE
    assert float((simulated - dense)[real].abs().max()) > 1e-3, "a budget of 5 must change the simulated rows"


@pytest.mark.parametrize("arch", NOT_MLA)
def test_offload_decodes_like_the_label_cache(arch):
    model = tiny_model(arch)
    expected = decode(model, SMALL)
    offloaded = decode(model, SMALL.replace(offload=True))
    assert isinstance(offloaded[2], ds.OffloadCache)
    assert_same(offloaded, expected)
    # With prefetching every layer still copies synchronously here (sync_layers), so the result is exact.
    assert_same(decode(model, SMALL.replace(offload=True, prefetch=True, sync_layers=(0, 1))), expected)


@pytest.mark.parametrize("arch", NOT_MLA)
def test_predicted_copies_attend_with_sinks_and_softcap(arch):
    # Three full layers (a sliding layer predicts nothing): layers 1 and 2 attend over the rows that the layer
    # before them predicted and copied. A budget covering every token makes any prediction exact.
    model = tiny_model(arch, num_layers=3, layer_types=["full_attention"] * 3)
    full = ds.SparsityConfig(num_channels=4, token_budget=64, label_bits=8, sink_tokens=0, recent_tokens=0)
    predicted = full.replace(offload=True, prefetch=True, sync_layers=())
    _, _, cache = result = decode(model, predicted, cache=dict(measure_recall=True))
    assert cache.prefetcher.sync_layers() == [0]
    assert_same(result, decode(model, full))


@pytest.mark.parametrize("method", ["oracle_topk", "h2o", "quest"])
@pytest.mark.parametrize("arch", SPECIAL)
def test_the_baselines_attend_with_sinks_softcap_and_value_widths(arch, method):
    # Teacher-forced (simulate) with a budget of 11: the rows that see at most 11 keys keep all of them
    # through the baselines' selective attention and must be the dense model's rows; the last row of the
    # 12-token prompt drops one key and must not be.
    model = tiny_model(arch)
    input_ids, attention_mask = left_padded_batch([12, 9], seed=5)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    config = ds.SparsityConfig(
        num_channels=4, token_budget=11, simulate=True, label_bits=16, sink_tokens=0, recent_tokens=0
    )
    with torch.no_grad():
        dense = model(**kwargs).logits
        with make_method(method).patch(model, config, random_channel_mask(model)):
            sparse = model(**kwargs).logits
    seen = attention_mask.cumsum(dim=1)
    kept_all = attention_mask.bool() & (seen <= 11)
    assert float((sparse - dense)[kept_all].abs().max()) <= TOLERANCE
    assert float((sparse - dense)[0, -1].abs().max()) > 1e-4


@pytest.mark.parametrize("arch", NOT_MLA)
def test_dense_layers_keep_sinks_and_softcap(arch):
    # Every layer configured dense: the exact dense path of every call (prefill and decode) is the model's.
    model = tiny_model(arch)
    with torch.no_grad():
        input_ids, attention_mask = left_padded_batch([12, 9], seed=2)
        dense = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True, suppress_tokens=[0],
        )  # fmt: skip
    patched = decode(model, SMALL.replace(dense_layers=(0, 1)))
    assert_same(patched, (dense.sequences, torch.stack(dense.logits)))
