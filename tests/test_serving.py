"""What SGLang's classic Double Sparsity backend can serve, checked against its indexing rules.

`classic_scores` restates, in a few torch lines, how that backend uses the authors' JSON table (read in
sglang's python/sglang/srt/layers/attention/double_sparsity_backend.py and triton_ops/
double_sparsity_attention.py): one table [rows, r] per layer gathers both the key labels
(`gather(k, 2, table)`, written into a label buffer of H_kv rows) and the query labels
(`gather(q, 2, table)`), and the approximate-score kernel runs one program per query-label row against
KV head `row // (rows // H_kv)`. `sglang_classic_problem` must say "servable" exactly when that gives
every query head its own head's labels.
"""

import pytest
import torch

from doublesparse import HeadLayout
from doublesparse.serving import sglang_classic_note, sglang_classic_problem


def classic_scores(num_heads: int, num_kv_heads: int, table_rows: int, head_dim: int = 8, r: int = 2):
    """Query heads scored, and whether each was scored against its own KV head; raises where SGLang fails."""
    tokens = 5
    table = torch.stack([torch.randperm(head_dim)[:r] for _ in range(table_rows)])
    keys = torch.randn(tokens, num_kv_heads, head_dim)
    label_buffer = torch.empty(tokens, num_kv_heads, r)
    label_buffer[:] = torch.gather(keys, 2, table.unsqueeze(0).expand(tokens, -1, -1))
    query = torch.randn(1, num_heads, head_dim)
    q_label = torch.gather(query, 2, table.unsqueeze(0).expand(1, -1, -1))
    group = q_label.shape[1] // label_buffer.shape[1]
    if group == 0:
        raise ZeroDivisionError("the score kernel's KV head index divides by zero")
    scored = q_label.shape[1]
    own_kv = all(row // group == row // (num_heads // num_kv_heads) for row in range(scored))
    return scored, own_kv


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
def test_servable_exactly_when_every_query_head_is_scored_against_its_kv_head(num_heads, num_kv_heads):
    layout = HeadLayout(num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)
    # The tables the authors' format can hold: per query head (q, qk), per KV head (k), or one row.
    served_by_some_table = False
    for rows in {num_heads, num_kv_heads, 1}:
        try:
            scored, own_kv = classic_scores(num_heads, num_kv_heads, rows)
        except (RuntimeError, ZeroDivisionError):
            continue
        served_by_some_table |= scored == num_heads and own_kv
    assert served_by_some_table == (sglang_classic_problem(layout) is None)


def test_per_query_head_tables_fail_and_kv_tables_score_too_few_heads_for_gqa():
    with pytest.raises(RuntimeError):
        classic_scores(4, 2, table_rows=4)
    assert classic_scores(4, 2, table_rows=2) == (2, False)


def test_notes_for_mha_and_gqa():
    mha = HeadLayout(num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8)
    gqa = HeadLayout(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    assert sglang_classic_note(mha).startswith("note:") and "--tp-size 1" in sglang_classic_note(mha)
    assert sglang_classic_note(gqa).startswith("warning:")
    assert "--tp-size 1" in sglang_classic_problem(mha, tensor_parallel_size=2)
