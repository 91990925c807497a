"""`doublesparse bench decode`: end-to-end decode speed, dense against Double Sparsity, at model shapes.

For each context length and batch size it builds the model at real shapes with random weights (no
download; speed does not depend on weight values), fills a preallocated cache with `context` tokens,
and times greedy decode steps of the same `StaticDecoder` loop twice: unpatched (transformers'
StaticCache, dense SDPA) and patched with Double Sparsity (StaticDoubleSparseCache). The cache is
filled either by a real prefill (`--prefill model`) or, by default, by writing random keys and
values of the model's shape straight into it (`--prefill synthetic`), which makes long contexts
affordable on a CPU; labels are computed from those keys exactly as at decode time.
Reported: ms per step and tokens/s (medians over the timed steps), cache memory, peak device memory
on CUDA, and the Double Sparsity / dense speed ratio; JSON with every setting, and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from doublesparse.kernels.dispatch import BACKENDS

HELP = "time end-to-end decode steps, dense vs Double Sparsity, on models built at real shapes (JSON, plot)"

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, intermediate_size=14336, vocab_size=32768, sliding_window=None)),
    # Llama-shaped and small enough for a 2-core CPU: 8 layers, 8 KV heads, head_dim 128.
    "llama-8l-cpu": ("LlamaConfig", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                         head_dim=128, intermediate_size=2816, vocab_size=32000)),
    "tiny": ("LlamaConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=32, intermediate_size=256, vocab_size=512)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the decode benchmark."""
    parser.add_argument("--config", default=None, choices=sorted(PRESETS), help="model shape (default: llama-3.1-8b on CUDA, llama-8l-cpu on CPU)")
    parser.add_argument("--context", default=None, help="comma-separated cached lengths, K = 1024 (default: 8K,32K,128K on CUDA, 32K on CPU)")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 1,8 on CUDA, 1 on CPU)")
    parser.add_argument("--budget", default="1/16", help="token budget fraction (default: 1/16)")
    parser.add_argument("--channels", type=int, default=16, help="label channels r (default: 16)")
    parser.add_argument("--label-bits", type=int, default=4, choices=(16, 8, 4), help="label width (default: 4)")
    parser.add_argument("--selection", default="group", choices=("group", "head"), help="selection per KV group or per query head")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per method (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    parser.add_argument("--prefill", default="synthetic", choices=("synthetic", "model"), help="how the cache is filled (default: synthetic)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights and cache dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs with --compile-mode reduce-overhead)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, caches and channels")
    parser.add_argument("--out-dir", default="./results/bench-decode", help="folder for bench_decode.json and .png")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_model(preset: str, dtype, device, seed: int):
    """The preset's model with random weights, in eval mode, on `device`."""
    import torch
    import transformers

    config_name, values = PRESETS[preset]
    config = getattr(transformers, config_name)(**values, max_position_embeddings=1 << 20, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def fill_cache(model, decoder, cache, batch: int, context: int, prefill: str, seed: int):
    """Put `context` tokens in `cache`; return the last logits [B, V] and the mask buffer."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if prefill == "model":
        ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
        return decoder.prefill(ids, torch.ones_like(ids), cache)
    layout = _layout(model)
    dtype = next(model.parameters()).dtype
    chunk = 4096
    for layer_idx in range(layout.num_layers):
        for start in range(0, context, chunk):
            span = min(chunk, context - start)
            keys, values = torch.randn(2, batch, layout.num_kv_heads, span, layout.head_dim, generator=generator).to(device, dtype)
            cache.update(keys, values, layer_idx)
    mask = torch.zeros(batch, decoder.max_cache_len, dtype=torch.long, device=device)
    mask[:, :context] = 1
    logits = torch.randn(batch, model.config.vocab_size, generator=generator).to(device)
    return logits, mask


def _layout(model):
    from doublesparse import HeadLayout

    return HeadLayout.from_config(model.config)


def time_steps(decoder, cache, mask, logits, context: int, steps: int, warmup: int, synchronize: Callable[[], None]) -> list[float]:
    """Seconds of each timed decode step (after `warmup` untimed ones)."""
    positions = mask[:, :context].long().sum(-1, keepdim=True)
    timings = []
    for step in range(warmup + steps):
        token = logits.argmax(-1, keepdim=True)
        synchronize()
        start = time.perf_counter()
        logits = decoder.step(cache, mask, token, context + step, positions + step)
        synchronize()
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    return timings


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON and the plot."""
    import torch
    from fractions import Fraction
    from tqdm import tqdm

    import doublesparse as ds
    from doublesparse.decode import StaticDecoder

    from .bench_kernels import parse_contexts
    from doublesparse.provenance import provenance

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here")
    preset = args.config or ("llama-3.1-8b" if device.type == "cuda" else "llama-8l-cpu")
    contexts = parse_contexts(args.context or ("8K,32K,128K" if device.type == "cuda" else "32K"))
    batches = _positive_ints(args.batch or ("1,8" if device.type == "cuda" else "1"), "--batch")
    budget = Fraction(args.budget)
    if not 0 < budget <= 1:
        raise ValueError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ds.SparsityConfig(num_channels=args.channels, token_budget=float(budget), label_bits=args.label_bits,
                               selection=args.selection, backend=args.backend)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    model = build_model(preset, dtype, device, args.seed)
    layout = _layout(model)
    config.check_model(layout.num_layers, layout.head_dim)
    generator = torch.Generator().manual_seed(args.seed)
    ranking = torch.rand(layout.num_layers, layout.num_kv_heads, layout.head_dim, generator=generator).argsort(dim=-1)
    mask = ds.ChannelMask(ranking, "qk", layout, per_kv_head=True, calibration={"source": "random (speed only)"})

    rows = []
    cases = [(context, batch) for context in contexts for batch in batches]
    progress = tqdm(total=2 * len(cases), desc="bench decode", disable=args.no_progress)
    for context, batch in cases:
        max_len = context + args.warmup + args.steps + 2
        measured = {}
        for method in ("dense", "double_sparsity"):
            if method == "double_sparsity":
                ds.apply(model, mask, config)
            try:
                decoder = StaticDecoder(model, max_len, compile=args.compile, compile_mode=args.compile_mode)
                cache = decoder.new_cache()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                logits, buffer = fill_cache(model, decoder, cache, batch, context, args.prefill, args.seed)
                seconds = time_steps(decoder, cache, buffer, logits, context, args.steps, args.warmup, synchronize)
                memory = cache.memory() if hasattr(cache, "memory") else _static_cache_bytes(cache)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            finally:
                if method == "double_sparsity":
                    ds.remove(model)
            del cache, decoder
            step = statistics.median(seconds)
            measured[method] = step
            rows.append({"context": context, "batch": batch, "method": method, "ms_per_step": 1e3 * step,
                         "tokens_per_s": batch / step, "step_seconds": seconds, "cache_bytes": memory,
                         "peak_device_bytes": peak})
            progress.update(1)
        rows[-1]["speedup_vs_dense"] = measured["dense"] / measured["double_sparsity"]
    progress.close()

    report = {
        "benchmark": "decode",
        "settings": {"config": preset, "model_shape": PRESETS[preset][1], "contexts": contexts, "batches": batches,
                     "budget": str(budget), "sparsity_config": config.to_dict(), "steps": args.steps, "warmup": args.warmup,
                     "prefill": args.prefill, "dtype": str(dtype).replace("torch.", ""), "compile": args.compile,
                     "compile_mode": args.compile_mode, "seed": args.seed},
        **provenance(device),
        "rows": rows,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_decode.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    if not args.no_plot:
        plot(report, out_dir / "bench_decode.png")
    print(f"wrote {out_dir / 'bench_decode.json'}")
    return 0


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of ints") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag}: values must be >= 1, got {text!r}")
    return values


def _static_cache_bytes(cache) -> dict[str, int]:
    keys = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers if layer.keys is not None)
    values = sum(layer.values.numel() * layer.values.element_size() for layer in cache.layers if layer.values is not None)
    return {"keys": keys, "values": values, "labels": 0, "total": keys + values}


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    settings = report["settings"]
    lines = [
        f"decode benchmark: {settings['config']}, {settings['dtype']}, budget {settings['budget']}, "
        f"r={settings['sparsity_config']['num_channels']}, {settings['sparsity_config']['label_bits']}-bit labels, "
        f"prefill {settings['prefill']}, device {report['device']}",
        f"{'context':>8} {'batch':>5} {'method':<16} {'ms/step':>9} {'tokens/s':>9} {'cache MB':>9} {'speed-up':>8}",
    ]
    for row in report["rows"]:
        speedup = f"{row['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in row else ""
        lines.append(
            f"{row['context']:>8} {row['batch']:>5} {row['method']:<16} {row['ms_per_step']:>9.2f} "
            f"{row['tokens_per_s']:>9.2f} {row['cache_bytes']['total'] / 2**20:>9.1f} {speedup:>8}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Tokens/s against context, one line per method and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for batch in report["settings"]["batches"]:
        for method in ("dense", "double_sparsity"):
            points = [(r["context"], r["tokens_per_s"]) for r in report["rows"] if r["batch"] == batch and r["method"] == method]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{method}, batch {batch}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("tokens/s")
    settings = report["settings"]
    axis.set_title(f"decode speed, {settings['config']}, budget {settings['budget']} ({report['device_type']})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
