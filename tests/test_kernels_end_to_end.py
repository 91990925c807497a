"""A tiny model decodes the same tokens with the Triton kernels as with the torch references."""

import pytest
import torch

import doublesparse as ds
from kernel_cases import DEVICE
from tiny_models import left_padded_batch, random_channel_mask, tiny_model


def greedy(model, input_ids, attention_mask, steps):
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize(
    "selection, label_bits, per_kv_head",
    [("group", 4, False), ("head", 8, True)],
)
def test_triton_backend_decodes_like_torch_backend(selection, label_bits, per_kv_head):
    model = tiny_model("llama", num_heads=8, num_kv_heads=2).to(DEVICE)
    mask = random_channel_mask(model, seed=5, per_kv_head=per_kv_head)
    input_ids, attention_mask = left_padded_batch([21, 14], seed=2)
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    runs = {}
    for backend in ("torch", "triton"):
        config = ds.SparsityConfig(
            num_channels=4, token_budget=0.3, label_bits=label_bits, sink_tokens=1, recent_tokens=2,
            selection=selection, backend=backend,
        )
        with torch.no_grad(), ds.patched(model, mask, config):
            runs[backend] = greedy(model, input_ids, attention_mask, steps=3)
    assert torch.equal(runs["triton"].sequences, runs["torch"].sequences)
    for triton_logits, torch_logits in zip(runs["triton"].logits, runs["torch"].logits):
        torch.testing.assert_close(triton_logits, torch_logits, atol=1e-4, rtol=1e-4)
