"""Selection through the dispatcher: fixed shapes, forced tokens and padding as the reference says."""

import pytest
import torch

from doublesparse.kernels.dispatch import select_tokens
from doublesparse.kernels.selection import select_tokens_reference

from kernel_cases import DEVICE


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selection_keeps_forced_tokens_and_skips_padding(backend):
    generator = torch.Generator().manual_seed(0)
    batch, heads, length = 3, 4, 101  # odd length, budgets not powers of two
    scores = torch.randn(batch, heads, 1, length, generator=generator).to(DEVICE)
    valid = torch.ones(batch, 1, length, dtype=torch.bool, device=DEVICE)
    valid[1, 0, :40] = False  # left padding
    scores[1, ..., :40] = 1e9  # padding would win on score alone
    budgets = torch.tensor([[13], [7], [29]], device=DEVICE)
    indices, slot_valid = select_tokens(scores, valid, budgets, 2, 3, 29, backend)
    assert indices.shape == (batch, heads, 1, 29) and slot_valid.shape == (batch, 1, 1, 29)
    expected = select_tokens_reference(scores, valid, budgets, 2, 3, 29)
    assert torch.equal(indices, expected[0]) and torch.equal(slot_valid, expected[1])
    for b in range(batch):
        first = int(valid[b, 0].float().argmax())
        for h in range(heads):
            chosen = set(indices[b, h, 0][slot_valid[b, 0, 0]].tolist())
            assert len(chosen) == int(budgets[b, 0])
            assert {length - 1, length - 2, length - 3, first, first + 1} <= chosen
            assert all(valid[b, 0, t] for t in chosen)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    from doublesparse.kernels.dispatch import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")  # native kernels where they build
