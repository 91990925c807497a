"""Small budgets: the decode step against an independent, straightforward implementation."""

import math

import pytest
import torch

import doublesparse as ds
from doublesparse.attention import PLAN_ATTRIBUTE, double_sparse_attention
from doublesparse.kernels.selection import select_tokens_reference
from doublesparse.plan import LayerPlan

from tiny_models import left_padded_batch, random_channel_mask, tiny_model


def quantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Labels as the cache stores them, written out plainly, one token at a time."""
    if bits == 16:
        return x.half().float()
    out = torch.empty_like(x)
    levels = 2**bits - 1
    for index in range(x.shape[0]):
        row = x[index]
        scale = ((row.max() - row.min()) / levels).clamp_min(1e-8).half().float()
        offset = row.min().half().float()
        codes = torch.clamp(torch.round((row - offset) / scale), 0, levels)
        out[index] = offset + scale * codes
    return out


def straightforward_decode(q, k, v, valid, channels, config, scaling):
    """Loop over batch rows and query heads: score, force, pick the top-k, softmax, sum."""
    batch, num_q, _, head_dim = q.shape
    num_kv = k.shape[1]
    num_label_heads = channels.shape[0]
    out = torch.zeros(batch, 1, num_q, head_dim)
    for b in range(batch):
        positions = [t for t in range(k.shape[2]) if valid[b, t]]
        n = len(positions)
        budget = config.budget_for(n)
        recent = min(max(config.recent_tokens, 1), budget)
        sinks = min(config.sink_tokens, budget - recent)
        forced = set(positions[n - recent :]) | set(positions[:sinks])

        def score(h, t, b=b):
            label_head = h // (num_q // num_label_heads)
            kv = label_head // (num_label_heads // num_kv)
            label = quantized(k[b, kv, t][channels[label_head]][None], config.label_bits)[0]
            return float(scaling * (q[b, h, 0, channels[label_head]] * label).sum())

        group = num_q // num_kv
        for h in range(num_q):
            if config.selection == "group":
                members = range((h // group) * group, (h // group + 1) * group)
                scores = {t: max(score(g, t) for g in members) for t in positions}
            else:
                scores = {t: score(h, t) for t in positions}
            rest = sorted((t for t in positions if t not in forced), key=lambda t: -scores[t])
            chosen = sorted(forced) + rest[: budget - len(forced)]
            kv = h // group
            logits = torch.stack([scaling * (q[b, h, 0] * k[b, kv, t]).sum() for t in chosen])
            weights = torch.softmax(logits, dim=0)
            out[b, 0, h] = sum(w * v[b, kv, t] for w, t in zip(weights, chosen))
    return out


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("sink_tokens, recent_tokens", [(0, 0), (2, 3)])
@pytest.mark.parametrize("label_bits", [16, 4])
@pytest.mark.parametrize("budget", [7, 0.3])
@pytest.mark.parametrize("num_kv", [2, 4])
def test_decode_step_matches_straightforward_implementation(
    selection, sink_tokens, recent_tokens, label_bits, budget, num_kv
):
    torch.manual_seed(0)
    batch, num_q, length, head_dim, r = 2, 4, 23, 16, 4
    q = torch.randn(batch, num_q, 1, head_dim)
    k = torch.randn(batch, num_kv, length, head_dim) * torch.linspace(0.2, 3, head_dim)
    v = torch.randn(batch, num_kv, length, head_dim)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    label_heads = num_kv if selection == "group" else num_q
    channels = torch.stack([torch.randperm(head_dim)[:r].sort().values for _ in range(label_heads)])
    config = ds.SparsityConfig(
        num_channels=r,
        token_budget=budget,
        label_bits=label_bits,
        sink_tokens=sink_tokens,
        recent_tokens=recent_tokens,
        selection=selection,
        backend="torch",
    )
    module = torch.nn.Module().eval()
    setattr(module, PLAN_ATTRIBUTE, LayerPlan(0, config, channels, num_kv if selection == "group" else num_q))
    mask = valid[:, None, None, :]
    scaling = 1 / math.sqrt(head_dim)
    out, _ = double_sparse_attention(module, q, k, v, mask, scaling=scaling)
    expected = straightforward_decode(q, k, v, valid, channels, config, scaling)
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_padding_is_never_selected_and_the_current_token_always_is():
    torch.manual_seed(1)
    batch, heads, length, budget = 3, 2, 40, 5
    scores = torch.randn(batch, heads, 1, length)
    valid = torch.ones(batch, 1, length, dtype=torch.bool)
    valid[0, 0, :20] = False
    valid[2, 0, :35] = False
    scores[..., :20] = 1e9  # padding would win on score alone
    scores[..., -1] = -1e9  # the current token would lose on score alone
    lengths = valid.sum(-1)
    budgets = torch.clamp(lengths, max=budget)
    indices, slot_valid = select_tokens_reference(scores, valid, budgets, 0, 0, budget)
    for b in range(batch):
        for h in range(heads):
            chosen = indices[b, h, 0][slot_valid[b, 0, 0]].tolist()
            assert length - 1 in chosen
            assert all(valid[b, 0, t] for t in chosen)
            assert len(set(chosen)) == int(budgets[b, 0])


@pytest.mark.parametrize("selection", ["group", "head"])
def test_simulate_rows_equal_token_by_token_decoding(selection):
    model = tiny_model("llama", num_layers=2)
    config = ds.SparsityConfig(
        num_channels=4, token_budget=5, label_bits=8, sink_tokens=1, recent_tokens=1, selection=selection
    )
    input_ids, attention_mask = left_padded_batch([18, 13], seed=3)
    with torch.no_grad(), ds.patched(model, random_channel_mask(model, seed=4), config):
        teacher_forced = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        assert ds.patch_state(model).config.simulate is False
    with torch.no_grad(), ds.patched(model, random_channel_mask(model, seed=4), config.replace(simulate=True)):
        simulated = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        cache = ds.make_cache(model)
        stepwise = []
        for position in range(input_ids.shape[1]):
            step = model(
                input_ids=input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                past_key_values=cache,
            )
            stepwise.append(step.logits[:, 0])
    stepwise = torch.stack(stepwise, dim=1)
    real = attention_mask.bool()
    assert (simulated - stepwise)[real].abs().max() <= 1e-5
    # Prefill outside simulate mode is dense, so long rows must differ from the sparse rows.
    assert (teacher_forced - simulated)[real].abs().max() > 1e-3
