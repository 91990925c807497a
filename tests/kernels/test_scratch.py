"""The torch references compute the same with a Scratch as without, and reuse its memory step after step."""

import pytest
import torch

from doublesparse.kernels.label_append import make_labels_reference
from doublesparse.kernels.label_scores import label_scores_reference
from doublesparse.kernels.scratch import Scratch
from doublesparse.kernels.selection import ranking_keys, select_tokens_reference
from doublesparse.kernels.sparse_attention import sparse_attention_reference


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("num_kv_heads, num_select_heads", [(2, 2), (2, 8), (8, 8)])
def test_decode_ops_with_scratch_equal_them_without(bits, num_kv_heads, num_select_heads):
    generator = torch.Generator().manual_seed(bits + num_kv_heads + num_select_heads)
    batch, num_q_heads, length, head_dim, budget = 2, 8, 77, 32, 19
    keys, values = torch.randn(2, batch, num_kv_heads, length, head_dim, generator=generator).unbind(0)
    query = torch.randn(batch, num_q_heads, 1, head_dim, generator=generator)
    channels = torch.stack([torch.randperm(head_dim, generator=generator)[:8] for _ in range(num_kv_heads)])
    labels = make_labels_reference(keys, channels, bits)
    q_labels = torch.gather(
        query, 3, channels.repeat_interleave(num_q_heads // num_kv_heads, 0)[None, :, None].expand(batch, -1, 1, -1)
    )
    valid = torch.ones(batch, 1, length, dtype=torch.bool)
    valid[1, :, :20] = False  # left padding
    budgets = torch.tensor([[budget], [budget - 4]])

    def step(scratch):
        scores = label_scores_reference(q_labels, labels, bits, 0.2, num_select_heads, scratch)
        indices, slot_valid = select_tokens_reference(scores, valid, budgets, 2, 3, budget, scratch)
        out = sparse_attention_reference(query, keys, values, indices, slot_valid, 0.2, scratch)
        return scores.clone(), indices.clone(), out

    expected = step(None)
    scratch = Scratch()
    first = step(scratch)
    pointers = {name: buffer.data_ptr() for name, buffer in scratch._buffers.items()}
    second = step(scratch)
    for want, got, again in zip(expected, first, second):
        assert torch.equal(want, got) and torch.equal(want, again)
    assert pointers == {name: buffer.data_ptr() for name, buffer in scratch._buffers.items()}, (
        "buffers were reallocated"
    )
    assert scratch.nbytes() > 0


def test_ranking_keys_order_scores_exactly_with_ties_to_the_later_position():
    scores = torch.tensor([[0.5, -0.0, 0.0, -1.5, 0.5, float("-inf"), float("inf"), -1e-30, 1e-30]])
    keys = ranking_keys(scores, Scratch())
    order = keys.argsort(dim=-1, descending=True)[0].tolist()
    assert order == [6, 4, 0, 8, 2, 1, 7, 3, 5]  # +0.0 and -0.0 are distinct bit patterns: +0.0 first
