"""The tested architecture matrix: every family of doublesparse/architectures.py, from a tiny config.

For each family: at full budget the patched model is the dense model (logits within 1e-5 in fp32, the
same greedy tokens); at a small budget it equals an independent reference (the model's own eager
attention over the keys a straightforward loop selects, tests/reference_selection.py) with the sparse
kernels running; with a budget of length - 1 whose dropped key is known (every other key is a forced sink
or recent token) it equals the unpatched model given a 4D mask that drops that key; and the RoPE pairs
`keep_rope_pairs` keeps together are the channels RoPE really turns together in its keys.
"""

import sys

import pytest
import torch
from reference_selection import reference_patched

import doublesparse as ds
from doublesparse import label_attention
from doublesparse.architectures import TESTED, rope_pairs
from doublesparse.layout import HeadLayout

from tiny_models import MATRIX, left_padded_batch, random_channel_mask, tiny_config, tiny_model

TOLERANCE = 1e-5
SMALL = ds.SparsityConfig(num_channels=4, token_budget=5, label_bits=16, sink_tokens=1, recent_tokens=1)
STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models decode faster on one thread (and the machine is shared)."""


def greedy(model, input_ids, attention_mask, steps=STEPS):
    # The pad token is never generated: its embedding is zero in most families, and a zero query scores every
    # key alike, leaving the selection to tie-breaking (which the reference and the kernels do differently).
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        suppress_tokens=[0],
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def max_step_difference(first, second) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first.logits, second.logits))


def full_layers(model) -> list[int]:
    """The layers that attend over every past key (their config's layer types; all layers without them)."""
    config = model.config.get_text_config(decoder=True)
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [index for index, kind in enumerate(kinds) if kind == "full_attention"]


def all_full(arch) -> dict:
    """Config overrides that make every layer a full-attention one (for masks that every layer must apply)."""
    config = tiny_config(arch)
    return (
        {"layer_types": ["full_attention"] * config.num_hidden_layers} if getattr(config, "layer_types", None) else {}
    )


class Spy:
    """Counts the calls of the sparse step's selection and sparse attention, keeping the selections."""

    def __init__(self, monkeypatch):
        self.selections = []
        self.attentions = 0
        select, attend = label_attention.select_tokens, label_attention.sparse_attention

        def counted_select(*args, **kwargs):
            result = select(*args, **kwargs)
            self.selections.append(result)
            return result

        def counted_attend(*args, **kwargs):
            self.attentions += 1
            return attend(*args, **kwargs)

        # A one-row decode step runs the fused op (scores, selection, attention in one call): here it runs
        # the three ops it fuses (equal to it, tests/kernels/test_fused_decode.py), so each is seen.
        def separate_decode(query, keys, values, channels, labels, bits, valid, budgets, sinks, recent, slots,
                            scaling, num_select_heads, backend="auto", scratch=None):  # fmt: skip
            scores = label_attention.label_scores(
                label_attention.query_labels(query, channels), labels, bits, scaling, num_select_heads, backend, scratch
            )
            indices, slot_valid = counted_select(scores, valid, budgets, sinks, recent, slots, backend, scratch)
            return counted_attend(query, keys, values, indices, slot_valid, scaling, backend, scratch)

        monkeypatch.setattr(label_attention, "select_tokens", counted_select)
        monkeypatch.setattr(label_attention, "sparse_attention", counted_attend)
        monkeypatch.setattr(label_attention, "fused_decode", separate_decode)


def test_the_matrix_is_what_the_tests_build():
    assert set(TESTED) == set(MATRIX)


@pytest.mark.parametrize("arch, without", [("gpt_oss", "sinks"), ("gemma2", "attn_logit_softcapping")])
def test_the_sinks_and_the_softcap_of_the_tiny_models_matter(arch, without):
    # Else the tests below could not tell a path that drops them from one that keeps them.
    model = tiny_model(arch)
    input_ids, attention_mask = left_padded_batch([12, 9], seed=2)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if without == "sinks":
            for module in model.modules():
                if isinstance(getattr(module, "sinks", None), torch.Tensor):
                    module.sinks.fill_(float("-inf"))
        else:
            model = tiny_model(arch, attn_logit_softcapping=None)
        other = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert float((logits - other)[attention_mask.bool()].abs().max()) > 0.05


@pytest.mark.parametrize("arch", MATRIX)
def test_full_budget_equals_dense(arch):
    model = tiny_model(arch)
    input_ids, attention_mask = left_padded_batch([13, 8], seed=1)
    config = ds.SparsityConfig(num_channels=4, token_budget=64, label_bits=4, sink_tokens=0, recent_tokens=0)
    with torch.no_grad():
        dense_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        dense = greedy(model, input_ids, attention_mask)
        with ds.patched(model, random_channel_mask(model), config):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            sparse = greedy(model, input_ids, attention_mask)
    assert (logits - dense_logits)[attention_mask.bool()].abs().max() <= TOLERANCE
    assert max_step_difference(sparse, dense) <= TOLERANCE
    assert torch.equal(sparse.sequences, dense.sequences)


@pytest.mark.parametrize(
    "arch, selection",
    [(arch, "group") for arch in MATRIX] + [(arch, "head") for arch in ("llama", "gpt_oss", "gemma2", "deepseek_v3")],
)
def test_small_budget_equals_the_independent_reference(arch, selection, monkeypatch):
    model = tiny_model(arch)
    # One ranking per selection head: per KV head for group selection, per query head for head selection.
    mask = random_channel_mask(model, per_kv_head=selection == "group", seed=3)
    config = SMALL.replace(selection=selection)
    input_ids, attention_mask = left_padded_batch([12, 9], seed=2)
    sparse_layers = full_layers(model)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        dense = greedy(model, input_ids, attention_mask)
        with ds.patched(model, mask, config):
            sparse = greedy(model, input_ids, attention_mask)
        top = mask.top(config.num_channels)
        with reference_patched(model, {layer: top[layer] for layer in sparse_layers}, config):
            reference = greedy(model, input_ids, attention_mask)
    # Every decode step of every full-attention layer ran the selection and the sparse kernel.
    assert len(spy.selections) == spy.attentions == len(sparse_layers) * (STEPS - 1)
    assert max_step_difference(sparse, dense) > 1e-3, "a budget of 5 of 12+ tokens must change the logits"
    assert max_step_difference(sparse, reference) <= TOLERANCE
    assert torch.equal(sparse.sequences, reference.sequences)


@pytest.mark.parametrize("arch", MATRIX)
def test_dropping_one_key_equals_the_unpatched_model_masking_it(arch, monkeypatch):
    # Every layer full, so that the 4D mask given to the unpatched model drops the key where doublesparse does.
    model = tiny_model(arch, **all_full(arch))
    length, dropped = 12, 3
    # Keys 0..2 are sinks and the 8 newest recent: with a budget of 11 only key 3 is left out, by every head.
    config = ds.SparsityConfig(
        num_channels=4, token_budget=length - 1, sink_tokens=dropped, recent_tokens=length - 1 - dropped, label_bits=16
    )
    input_ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(4))
    spy = Spy(monkeypatch)
    with torch.no_grad():
        with ds.patched(model, random_channel_mask(model), config):
            cache = ds.make_cache(model)
            model(input_ids=input_ids[:, :-1], past_key_values=cache)
            sparse = model(input_ids=input_ids[:, -1:], past_key_values=cache).logits[:, -1]
        causal = torch.ones(length, length).tril().bool()
        causal[-1, dropped] = False
        mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min).expand(2, 1, length, length)
        masked = model(input_ids=input_ids, attention_mask=mask).logits[:, -1]
        full = model(input_ids=input_ids).logits[:, -1]
    assert len(spy.selections) == spy.attentions == model.config.num_hidden_layers
    for indices, slot_valid in spy.selections:
        assert indices.shape[-1] == length - 1 and bool(slot_valid.all())
        assert not bool((indices == dropped).any()), "the selection kept the key meant to be dropped"
    assert float((full - masked).abs().max()) > 1e-4, "dropping the key must change the logits"
    assert float((sparse - masked).abs().max()) <= TOLERANCE


def _layer0_keys(model, input_ids):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    keys = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        keys.setdefault(module.layer_idx, key.detach().clone())
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    AttentionInterface.register("doublesparse_test_keys", recording)
    AttentionMaskInterface.register("doublesparse_test_keys", eager_mask)
    model.set_attn_implementation("doublesparse_test_keys")
    with torch.no_grad():
        model(input_ids=input_ids)
    return keys[0]


@pytest.mark.parametrize(
    "arch, overrides",
    [(arch, {}) for arch in MATRIX if TESTED[arch].rope != "mixed"]
    + [("deepseek_v3", {"rope_interleave": False}), ("exaone4", {"sliding_window": None})],
)
def test_rope_pairs_are_the_channels_rope_turns_together(arch, overrides):
    # Layer 0's keys of one token at two positions differ only by RoPE: channels RoPE leaves alone are equal,
    # and every pair it turns together keeps its norm.
    model = tiny_model(arch, **all_full(arch), **overrides)
    layout = HeadLayout.from_config(model.config)
    pairs = rope_pairs(model.config, layout)
    # Far apart, so that even the slowest frequency (gpt-oss's YaRN divides it by 32) turns measurably.
    input_ids = torch.randint(8, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    input_ids[0, 0] = input_ids[0, -1] = 7
    keys = _layer0_keys(model, input_ids)
    first, later = keys[0, :, 0].double(), keys[0, :, -1].double()
    partner = pairs.partners(layout.head_dim)
    alone = partner == torch.arange(layout.head_dim)
    turned = ((first - later).abs() > 1e-6).any(dim=0)
    assert torch.equal(turned, ~alone), f"RoPE turns channels {turned.nonzero().flatten().tolist()}"
    norms_first = first**2 + first[:, partner] ** 2
    norms_later = later**2 + later[:, partner] ** 2
    torch.testing.assert_close(norms_first, norms_later, atol=1e-5, rtol=1e-5)


def test_keep_rope_pairs_is_refused_where_layers_differ_or_the_type_is_unknown():
    model = tiny_model("smollm3")  # its second layer has no RoPE
    with pytest.raises(ValueError, match="SmolLM3 applies RoPE on some layers only"):
        rope_pairs(model.config, HeadLayout.from_config(model.config))
    config = tiny_config("llama")
    config.model_type = "some_new_model"
    with pytest.raises(ValueError, match="does not know how 'some_new_model' pairs the rotary channels"):
        rope_pairs(config, HeadLayout.from_config(config))


def test_a_type_outside_the_matrix_is_served_with_a_warning_naming_it(caplog):
    model = tiny_model("llama")
    model.config.model_type = "llama_lookalike"  # a decoder whose calls look like Llama's, never tested
    with caplog.at_level("WARNING"), ds.patched(model, random_channel_mask(model), SMALL), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert "LlamaForCausalLM (model type 'llama_lookalike') is not in the tested architecture matrix" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), ds.patched(model, random_channel_mask(model), SMALL):
        pass
    assert "llama_lookalike" not in caplog.text, "the note is given once per process"
