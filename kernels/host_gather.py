"""Host gather: copy selected K/V rows from a host-memory store into a device buffer.

Store layout (token-major, so appending a token is one contiguous write, asynchronous into pinned
memory): `store [capacity, B, H_kv, d]`, read through `store.permute(1, 2, 0, 3)`.
Indices `[B, H_kv, N]` (token positions, on the device) pick N rows per KV head; the output view is
`[B, H_kv, N, d]` on the device (any strides). Keys and values live in stores of their own, so
each gathers rows of its own width d (d_k for keys, d_v for values where they differ, as in MLA)
with the same indices.

On CUDA the Triton kernel reads pinned host memory directly (unified virtual addressing maps
page-locked memory into the device's address space), so the indices never travel to the host and
the copy can be queued on a side stream with no host-blocking wait. The torch reference gathers on
the store's device: exact, used on CPU; where the store and the output are on different devices and
Triton is missing, it first brings the indices to the host (a synchronisation).
"""

from __future__ import annotations

import torch

try:  # the torch reference must import where triton is missing (e.g. macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


def _check_shapes(store: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> None:
    capacity, batch, heads, head_dim = store.shape
    if tuple(indices.shape[:2]) != (batch, heads) or tuple(out.shape) != (*indices.shape, head_dim):
        raise ValueError(
            f"indices {tuple(indices.shape)} and out {tuple(out.shape)} do not match a store of {tuple(store.shape)}: "
            f"indices must be [B={batch}, H={heads}, N] and out [B, H, N, {head_dim}] (the store's own row width)"
        )


def host_gather_reference(store: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Torch reference: out[b, h, n] = store[indices[b, h, n], b, h]; returns `out`."""
    _check_shapes(store, indices, out)
    rows = store.permute(1, 2, 0, 3)
    index = indices.to(store.device, non_blocking=False)
    picked = torch.gather(rows, 2, index[..., None].expand(-1, -1, -1, store.shape[-1]))
    out.copy_(picked, non_blocking=out.device.type == "cuda" and store.device.type == "cpu")
    return out


if triton is not None:

    @triton.jit
    def _host_gather_kernel(
        store_ptr,
        index_ptr,
        out_ptr,
        num_rows,
        head_dim,
        s_t,
        s_b,
        s_h,
        i_b,
        i_h,
        i_n,
        o_b,
        o_h,
        o_n,
        NUM_HEADS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        batch_head = tl.program_id(0)
        block = tl.program_id(1)
        b = batch_head // NUM_HEADS
        h = batch_head % NUM_HEADS
        slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        slot_ok = slots < num_rows
        # 64-bit offsets: a 256K-token store of 8 heads x 128 dims x batch 8 passes 2^31 elements.
        tokens = tl.load(index_ptr + b.to(tl.int64) * i_b + h * i_h + slots * i_n, mask=slot_ok, other=0).to(tl.int64)
        source = store_ptr + tokens[:, None] * s_t + b.to(tl.int64) * s_b + h * s_h + dims[None, :]
        keep = slot_ok[:, None] & (dims[None, :] < head_dim)
        rows = tl.load(source, mask=keep, other=0.0)
        target = out_ptr + b.to(tl.int64) * o_b + h * o_h + slots[:, None].to(tl.int64) * o_n + dims[None, :]
        tl.store(target, rows, mask=keep)


def host_gather_triton(
    store: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, block_rows: int = 32
) -> torch.Tensor:
    """Triton gather (pinned host store read from the device on CUDA); returns `out`."""
    if triton is None:
        raise ValueError("host_gather_triton needs triton installed")
    capacity, batch, heads, head_dim = store.shape
    if store.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("host gather needs the last (head_dim) dimension contiguous in the store and the output")
    _check_shapes(store, indices, out)
    num_rows = indices.shape[2]
    if num_rows == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    grid = (batch * heads, triton.cdiv(num_rows, block_rows))
    _host_gather_kernel[grid](
        store,
        indices,
        out,
        num_rows,
        head_dim,
        store.stride(0),
        store.stride(1),
        store.stride(2),
        *indices.stride(),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_HEADS=heads,
        BLOCK_N=block_rows,
        BLOCK_D=block_d,
    )
    return out
