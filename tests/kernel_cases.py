"""Shared helpers of the kernel parity tests: random problems and the parity check."""

from __future__ import annotations

import pytest
import torch

# The interpreter computes bf16 arithmetic wrongly; bf16 parity runs only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def output_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of an attention output rounded to `dtype` (fp32 accumulation in both paths)."""
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def random_channels(num_heads: int, head_dim: int, num_channels: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct random channels [num_heads, r] per head."""
    return torch.stack([torch.randperm(head_dim, generator=generator)[:num_channels] for _ in range(num_heads)]).to(DEVICE)


def randn(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values of `dtype` on the test device."""
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element written (no NaN) and within `tolerance` relative to the largest expected value."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "some outputs were never written (NaN poison left)"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"
