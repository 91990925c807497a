"""A tiny model decodes the same tokens with the Triton kernels as with the torch references."""

import pytest
import torch

import doublesparse as ds

from kernel_cases import DEVICE
from tiny_models import left_padded_batch, random_channel_mask, tiny_model


def greedy(model, input_ids, attention_mask, steps):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize(
    "selection, label_bits, per_kv_head, steps",
    [("group", 4, False, 3), ("head", 8, True, 2)],
)
def test_triton_backend_decodes_like_torch_backend(selection, label_bits, per_kv_head, steps):
    model = tiny_model("llama", num_heads=8, num_kv_heads=2).to(DEVICE)
    mask = random_channel_mask(model, seed=5, per_kv_head=per_kv_head)
    input_ids, attention_mask = left_padded_batch([21, 14], seed=2)
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    runs = {}
    for backend in ("torch", "triton"):
        config = ds.SparsityConfig(
            num_channels=4,
            token_budget=0.3,
            label_bits=label_bits,
            sink_tokens=1,
            recent_tokens=2,
            selection=selection,
            backend=backend,
        )
        with torch.no_grad(), ds.patched(model, mask, config):
            runs[backend] = greedy(model, input_ids, attention_mask, steps=steps)
    assert torch.equal(runs["triton"].sequences, runs["torch"].sequences)
    for triton_logits, torch_logits in zip(runs["triton"].logits, runs["torch"].logits):
        torch.testing.assert_close(triton_logits, torch_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_replays_in_a_cuda_graph():
    from doublesparse.kernels import dispatch
    from doublesparse.kernels.label_scores import gather_query_channels

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 32, 1, 128, generator=generator).cuda().half()
    keys = torch.randn(1, 8, 4096, 128, generator=generator).cuda().half()
    values = torch.randn(1, 8, 4096, 128, generator=generator).cuda().half()
    channels = torch.stack([torch.randperm(128, generator=generator)[:16] for _ in range(8)]).cuda()
    labels = dispatch.make_labels(keys, channels, 4)
    valid = torch.ones(1, 1, 4096, dtype=torch.bool, device="cuda")
    budgets = torch.full((1, 1), 256, device="cuda")

    def step():
        scores = dispatch.label_scores(gather_query_channels(query, channels), labels, 4, 128**-0.5, 8)
        indices, slot_valid = dispatch.select_tokens(scores, valid, budgets, 4, 16, 256)
        return dispatch.sparse_attention(query, keys, values, indices, slot_valid, 128**-0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
