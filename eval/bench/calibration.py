"""`doublesparse bench calibration`: calibration speed (tokens/s) against a plain forward pass over the same blocks.

Speed does not depend on weight or token values, so by default the model is a randomly initialised
tiny Llama (shape below) and the blocks are seeded random token ids; `--model` times a saved model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

from .common import set_threads, write_report

HELP = "time offline calibration (tokens/s) and its overhead over a plain forward pass"

# The default model: a tiny Llama, big enough that the forward pass, not Python, dominates.
TINY_LLAMA = dict(
    num_hidden_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    intermediate_size=512,
    vocab_size=2048,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the calibration benchmark."""
    parser.add_argument(
        "--model",
        help="model to time: a folder, a .gguf file, a hub id, 'smollm2' or 'bundled' "
        "(default: a random tiny Llama, see TINY_LLAMA)",
    )
    parser.add_argument("--blocks", type=int, default=64, help="calibration blocks (default: 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per block (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument(
        "--kind", default="qk", choices=("q", "k", "qk"), help="ranking kind (all three are collected anyway)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--no-baseline", action="store_true", help="skip timing the plain forward pass")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Time calibration (and a plain forward pass); print the figures."""
    import torch

    from doublesparse.calibration.calibrator import calibrate_blocks, check_settings
    from doublesparse.input_checks import check_device, check_model_folder
    from doublesparse.output_paths import check_output_file

    check_settings(kind=args.kind, num_samples=args.blocks, seq_len=args.seq_len, batch_size=args.batch_size)
    check_device(args.device)
    check_model_folder(args.model, needs_tokenizer=False)  # token ids are drawn at random: no tokenizer needed
    if args.json_out:
        check_output_file(args.json_out, "--json")
    set_threads(args.threads)
    model, name = _model(args.model, args.device)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, vocab, (args.blocks, args.seq_len), generator=generator)
    tokens = blocks.numel()

    # One small warm-up so one-time costs (kernel selection, lazy imports) stay out of the timing.
    calibrate_blocks(model, blocks[:1, : min(64, args.seq_len)], progress=False)
    started = time.perf_counter()
    calibrate_blocks(model, blocks, kind=args.kind, batch_size=args.batch_size, progress=False)
    calibrate_seconds = time.perf_counter() - started
    figures = {
        "model": name,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "blocks": args.blocks,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens": tokens,
        "calibrate_seconds": round(calibrate_seconds, 3),
        "calibrate_tokens_per_s": round(tokens / calibrate_seconds, 1),
    }
    if not args.no_baseline:
        forward_seconds = _plain_forward_seconds(model, blocks, args.batch_size)
        figures["forward_seconds"] = round(forward_seconds, 3)
        figures["forward_tokens_per_s"] = round(tokens / forward_seconds, 1)
        figures["capture_overhead"] = round(calibrate_seconds / forward_seconds - 1, 3)

    print(f"calibration benchmark: {name} on {args.device} ({figures['threads']} threads)")
    print(f"  {args.blocks} blocks x {args.seq_len} tokens = {tokens:,} tokens, batch {args.batch_size}")
    print(f"  calibrate: {calibrate_seconds:.2f} s, {tokens / calibrate_seconds:,.0f} tokens/s")
    if "forward_seconds" in figures:
        print(
            f"  plain forward: {figures['forward_seconds']:.2f} s, {figures['forward_tokens_per_s']:,.0f} tokens/s "
            f"(capture overhead {100 * figures['capture_overhead']:+.0f}%)"
        )
    if args.json_out:
        write_report(figures, Path(args.json_out), sort_keys=True)
    return 0


def _model(path: Optional[str], device: str) -> tuple[Any, str]:
    import torch
    import transformers

    if path:
        from doublesparse.loading import load_model

        model, _ = load_model(path, dtype=torch.float32, device=device)
        name = str(path)
    else:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**TINY_LLAMA)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        name = "random tiny Llama (4 layers, hidden 256, 8/4 heads, head_dim 32)"
    return model.to(device).eval(), name


def _plain_forward_seconds(model: Any, blocks: Any, batch_size: int) -> float:
    import torch

    device = model.get_input_embeddings().weight.device
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False, logits_to_keep=1)
    return time.perf_counter() - started
