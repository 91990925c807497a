"""`doublesparse bench offload`: decode-step latency at long contexts with the K/V in host memory.

For each context length and batch size it builds the model at real shapes with random weights (the
presets of `bench decode`; speed does not depend on weight values), makes a cache for `context`
tokens, fills it with `context - warmup - steps` random tokens, and times the decode steps that bring
it to `context` (one token, `position_ids`, the cache as `past_key_values`) of:
- `ds_offload`: Double Sparsity-Offload (doublesparse/offload.py): K/V in host memory, labels on the
  device, the selected rows of layer i+1 predicted and copied in while layer i computes;
- `full_offload`: the FlexGen-like baseline of eval/bench/full_offload.py: K/V in host memory, each layer's
  whole K/V copied in (overlapped one layer ahead the same way), stock SDPA over it;
- `dense`: the unpatched model with transformers' StaticCache on the device, where it fits in device
  memory (a row says why it was skipped otherwise).
The cache is filled by writing random keys and values of the model's shape through `cache.update`,
layer by layer in chunks (a real prefill at 256K tokens is not affordable); Double Sparsity's labels are
computed from those keys exactly as at decode time. A method whose cache does not fit in host (or
device) memory gives a skipped row instead of a timing.

Reported: median ms per step and tokens/s over the timed steps (after untimed warm-up steps), host and
device bytes of the cache, peak device memory during the steps on CUDA, and the speed-up of
ds_offload over full_offload; JSON with every setting and provenance, and a plot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from doublesparse.kernels.backends import BACKENDS

from ..harness.budgets import parse_budget
from ..models import presets
from .common import (
    cache_kv_bytes,
    check_report_outputs,
    check_threads,
    parse_contexts,
    positive_ints,
    pyplot,
    random_channel_mask,
    resolve_device,
    save_figure,
    set_threads,
    synchronizer,
    write_report,
)

HELP = "time decode steps with K/V in host memory: Double Sparsity-Offload vs full-KV offload vs dense (JSON, plot)"

METHODS = ("ds_offload", "full_offload", "dense")
CUDA_CONTEXTS = "32K,64K,128K,256K"
CPU_CONTEXTS = "8K"
FILL_CHUNK_BYTES = 256 << 20  # K+V bytes of one synthetic fill chunk: few chunks, bounded temporaries
DEVICE_HEADROOM = 0.1  # fraction of the dense KV kept free for activations, logits and the allocator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the offload benchmark."""
    add = parser.add_argument
    add(
        "--config",
        default=None,
        choices=sorted(presets.PRESETS),
        help="model shape (default: llama-3.1-8b on CUDA, llama-8l-cpu on CPU)",
    )
    add(
        "--context",
        default=None,
        help=f"comma-separated cached lengths, K = 1024 (default: {CUDA_CONTEXTS} on CUDA, {CPU_CONTEXTS} on CPU)",
    )
    add("--batch", default=None, help="comma-separated batch sizes (default: 1,8 on CUDA, 1 on CPU)")
    add(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods among {', '.join(METHODS)} (default: all)",
    )
    add("--budget", default="1/16", help="ds_offload token budget fraction (default: 1/16)")
    add("--channels", type=int, default=16, help="ds_offload label channels r (default: 16)")
    add("--label-bits", type=int, default=4, choices=(16, 8, 4), help="ds_offload label width (default: 4)")
    add(
        "--sync-layers",
        default="0",
        help="ds_offload layers that select with their own query and copy synchronously, comma-separated, or "
        "'auto' for the recall rule (default: 0; random weights make measured recall meaningless)",
    )
    add("--steps", type=int, default=8, help="timed decode steps per method (default: 8)")
    add("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    add(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="weights and cache dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    add("--device", help="cpu or cuda (default: cuda when available)")
    add("--backend", default="auto", choices=BACKENDS, help="ds_offload kernel backend (default: auto)")
    add("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of weights, caches and channels")
    add("--out-dir", default="./results/bench-offload", help="folder for bench_offload.json and .png")
    add("--no-plot", action="store_true", help="skip the plot")
    add("--no-progress", action="store_true", help="hide the progress bar")


def parse_methods(text: str) -> list[str]:
    """'ds_offload,dense' -> the methods in the order given; ValueError for unknown or repeated names."""
    methods = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods: {text!r} names {unknown or 'nothing'}; choose among {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: {text!r} repeats a method; name each once")
    return methods


def parse_sync_layers(text: str, num_layers: int) -> Optional[tuple[int, ...]]:
    """'0,3' -> (0, 3); 'auto' -> None (the recall rule); ValueError for anything else."""
    if text.strip() == "auto":
        return None
    try:
        layers = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ValueError(f"--sync-layers: {text!r} is not 'auto' or a comma-separated list of layer indices") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--sync-layers: {bad} out of range for {num_layers} layers (use 0..{num_layers - 1})")
    return layers


def fill_chunk_tokens(batch: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Tokens of one synthetic fill chunk: K+V of one layer in FILL_CHUNK_BYTES, at least 1024."""
    per_token = 2 * batch * num_kv_heads * head_dim * element_size
    return max(1024, FILL_CHUNK_BYTES // per_token)


def fill_cache(cache: Any, layout: Any, batch: int, context: int, dtype: Any, device: Any, seed: int) -> None:
    """Write `context` random tokens into every layer of `cache` through `cache.update`, in chunks."""
    import torch

    # Drawn on the device: generating hundreds of GB of K/V on the host would dominate the run.
    generator = torch.Generator(device=device).manual_seed(seed)
    element_size = torch.empty((), dtype=dtype).element_size()
    chunk = fill_chunk_tokens(batch, layout.num_kv_heads, layout.head_dim, element_size)
    for layer_idx in range(layout.num_layers):
        for start in range(0, context, chunk):
            span = min(chunk, context - start)
            shape = (batch, layout.num_kv_heads, span, layout.head_dim)
            keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            cache.update(keys, values, layer_idx)
            del keys, values


def time_decode(
    model: Any, cache: Any, batch: int, start: int, steps: int, warmup: int, synchronize: Callable[[], None], seed: int
) -> list[float]:
    """Seconds of each timed decode step after `warmup` untimed ones, the first at position `start`.

    Decoding is greedy from a random token.
    """
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    token = torch.randint(3, model.config.vocab_size, (batch, 1), generator=generator).to(device)
    timings = []
    for step in range(warmup + steps):
        positions = torch.full((batch, 1), start + step, dtype=torch.long, device=device)
        synchronize()
        began = time.perf_counter()
        logits = model(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True).logits
        synchronize()
        if step >= warmup:
            timings.append(time.perf_counter() - began)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return timings


def dense_fits(kv_bytes: int, device: Any) -> tuple[bool, str]:
    """Whether a dense on-device cache of `kv_bytes` fits beside the resident weights, and why (CPU: always)."""
    import torch

    if device.type != "cuda":
        return True, "CPU: always run"
    free, _ = torch.cuda.mem_get_info(device)
    # Memory torch holds in its cache but does not use is free for the cache too.
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = int(kv_bytes * (1 + DEVICE_HEADROOM)) + 2 * FILL_CHUNK_BYTES
    verdict = (
        f"needs ~{needed / 2**30:.1f} GiB (KV {kv_bytes / 2**30:.1f} GiB + headroom), "
        f"{available / 2**30:.1f} GiB free beside the weights"
    )
    return needed <= available, verdict


def device_cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes of the K/V tensors a transformers cache holds on the device."""
    keys, values = cache_kv_bytes(cache)
    return {"device_keys": keys, "device_values": values, "host": 0, "device": keys + values, "total": keys + values}


def release_memory(device: Any) -> None:
    """Return freed device memory and cached pinned host memory, so the next method sees them as free."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        # Pinned blocks stay cached by torch's host allocator and are not counted as available RAM.
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None
        )
        if empty_host_cache is not None:
            empty_host_cache()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON and the plot."""
    import torch
    from tqdm.auto import tqdm

    import doublesparse as ds
    from doublesparse.offload import host_kv_bytes
    from doublesparse.provenance import provenance

    # Every option is checked before any model is built.
    check_report_outputs(args.out_dir, "offload", plot=not args.no_plot)
    device = resolve_device(args.device)
    preset = args.config or ("llama-3.1-8b" if device.type == "cuda" else "llama-8l-cpu")
    contexts = parse_contexts(args.context or (CUDA_CONTEXTS if device.type == "cuda" else CPU_CONTEXTS), "--context")
    batches = positive_ints(args.batch or ("1,8" if device.type == "cuda" else "1"), "--batch")
    methods = parse_methods(args.methods)
    budget = parse_budget(args.budget, "--budget")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if min(contexts) <= args.warmup + args.steps:
        raise ValueError(
            f"--context {min(contexts)} must exceed --warmup + --steps = {args.warmup + args.steps}: the "
            "cache is filled with context - warmup - steps tokens and holds `context` after the last step"
        )
    check_threads(args.threads)
    shape = presets.PRESETS[preset][1]
    layout = ds.HeadLayout.from_config(presets.preset_config(preset))
    sparsity = ds.SparsityConfig(
        offload=True,
        prefetch=True,
        token_budget=float(budget),
        num_channels=args.channels,
        label_bits=args.label_bits,
        sync_layers=parse_sync_layers(args.sync_layers, layout.num_layers),
        backend=args.backend,
    )
    sparsity.check_model(layout.num_layers, layout.head_dim)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    set_threads(args.threads)
    synchronize = synchronizer(device)

    model = presets.build_model(preset, dtype, device, args.seed)
    mask = random_channel_mask(layout, args.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    rows = []
    cases = [(context, batch) for context in contexts for batch in batches]
    progress = tqdm(total=len(cases) * len(methods), desc="bench offload", disable=args.no_progress)
    for context, batch in cases:
        # The cache is made for exactly `context` tokens and holds them after the last timed step: with
        # power-of-two contexts the pinned host stores are then powers of two, which torch's pinned
        # allocator does not round up (it rounds every other size to the next power of two).
        prefix = context - args.warmup - args.steps
        for method in methods:
            progress.set_postfix_str(f"{method} {context} x{batch}")
            row = {"context": context, "batch": batch, "method": method}
            if method == "dense":
                kv_bytes = host_kv_bytes(
                    layout.num_layers, batch, layout.num_kv_heads, layout.head_dim, context, dtype, pinned=False
                )
                fits, verdict = dense_fits(kv_bytes, device)
                row["fit_check"] = verdict
                if not fits:
                    rows.append({**row, "skipped": f"does not fit in device memory: {verdict}"})
                    progress.update(1)
                    continue
            if method == "ds_offload":
                ds.apply(model, mask, sparsity)
            try:
                row.update(_run_method(method, model, layout, batch, prefix, context, dtype, device, args, synchronize))
            finally:
                if method == "ds_offload":
                    ds.remove(model)
                release_memory(device)
            rows.append(row)
            progress.update(1)
        _add_speedups(rows, context, batch)
    progress.close()

    report = {
        "benchmark": "offload",
        "settings": {
            "config": preset,
            "model_shape": shape,
            "layout": layout.to_dict(),
            "weight_bytes": weight_bytes,
            "contexts": contexts,
            "batches": batches,
            "methods": methods,
            "budget": str(budget),
            "sparsity_config": sparsity.to_dict(),
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": str(dtype).replace("torch.", ""),
            "backend": args.backend,
            "threads": args.threads,
            "seed": args.seed,
            "fill": "synthetic (random K/V through cache.update)",
            "filled": "context - warmup - steps tokens; the cache holds context tokens after the last timed step",
            "dense_cache": "transformers StaticCache",
            "peak_device_bytes": "during warm-up and timed steps",
        },
        **provenance(device),
        "rows": rows,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, out_dir / "bench_offload.json")
    print(format_table(report))
    if not args.no_plot:
        plot(report, out_dir / "bench_offload.png")
    plotted = "" if args.no_plot else f" and {out_dir / 'bench_offload.png'}"
    print(f"wrote {out_dir / 'bench_offload.json'}{plotted}")
    return 0


def _new_cache(method: str, model: Any, max_len: int, batch: int) -> Any:
    """An empty cache of `method` for `max_len` tokens; ValueError where host memory cannot hold the offloaded K/V."""
    from transformers import StaticCache

    from doublesparse import make_cache

    from .full_offload import make_full_offload_cache

    if method == "ds_offload":
        return make_cache(model, max_len, batch_size=batch)
    if method == "full_offload":
        return make_full_offload_cache(model, max_len, batch)
    return StaticCache(config=model.config, max_cache_len=max_len)


def _run_method(
    method: str,
    model: Any,
    layout: Any,
    batch: int,
    prefix: int,
    max_len: int,
    dtype: Any,
    device: Any,
    args: argparse.Namespace,
    synchronize: Callable[[], None],
) -> dict[str, Any]:
    """One method at one (context, batch), `prefix` tokens filled: the measured fields, or why it was skipped."""
    import torch

    try:
        cache = _new_cache(method, model, max_len, batch)
    except ValueError as error:  # host memory cannot hold it: found before anything is allocated
        return {"skipped": f"does not fit in host memory: {error}"}
    try:
        return _measure(cache, model, layout, batch, prefix, dtype, device, args, synchronize)
    except torch.cuda.OutOfMemoryError as error:
        return {"skipped": f"out of device memory: {str(error).splitlines()[0]}"}


def _measure(cache, model, layout, batch: int, prefix: int, dtype, device, args, synchronize) -> dict[str, Any]:
    """Fill `prefix` tokens into one method's cache and time its decode steps; the row's measured fields."""
    import torch

    with torch.no_grad():
        fill_cache(cache, layout, batch, prefix, dtype, device, args.seed)
        if device.type == "cuda":
            synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_decode(model, cache, batch, prefix, args.steps, args.warmup, synchronize, args.seed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    memory = cache.memory() if hasattr(cache, "memory") else device_cache_bytes(cache)
    step = statistics.median(seconds)
    measured = {
        "ms_per_step": 1e3 * step,
        "tokens_per_s": batch / step,
        "step_seconds": seconds,
        "host_bytes": memory["host"],
        "device_bytes": memory["device"],
        "cache_bytes": memory,
        "peak_device_bytes": peak,
    }
    prefetch_report = getattr(cache, "prefetch_report", None)
    if prefetch_report is not None:
        measured["sync_layers"] = prefetch_report().get("sync_layers")
    return measured


def _add_speedups(rows: list[dict[str, Any]], context: int, batch: int) -> None:
    """Speed-ups of ds_offload over full_offload (and dense) at one (context, batch), where both ran."""
    timed = {r["method"]: r for r in rows if r["context"] == context and r["batch"] == batch and "ms_per_step" in r}
    sparse = timed.get("ds_offload")
    if sparse is None:
        return
    for other in ("full_offload", "dense"):
        if other in timed:
            sparse[f"speedup_vs_{other}"] = timed[other]["ms_per_step"] / sparse["ms_per_step"]


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    settings = report["settings"]
    sparsity = settings["sparsity_config"]
    lines = [
        f"offload decode benchmark: {settings['config']}, {settings['dtype']}, ds_offload budget {settings['budget']}, "
        f"r={sparsity['num_channels']}, {sparsity['label_bits']}-bit labels, sync layers {sparsity['sync_layers']}, "
        f"{settings['steps']} steps after {settings['warmup']} warm-up, device {report['device']}",
        f"{'context':>8} {'batch':>5} {'method':<13} {'ms/step':>9} {'tokens/s':>9} {'host MB':>9} {'device MB':>9} "
        f"{'peak MB':>9} {'x full_off':>10}",
    ]
    for row in report["rows"]:
        head = f"{row['context']:>8} {row['batch']:>5} {row['method']:<13}"
        if "skipped" in row:
            lines.append(f"{head} skipped: {row['skipped']}")
            continue
        peak = "-" if row["peak_device_bytes"] is None else f"{row['peak_device_bytes'] / 2**20:.1f}"
        speedup = f"{row['speedup_vs_full_offload']:.2f}x" if "speedup_vs_full_offload" in row else ""
        lines.append(
            f"{head} {row['ms_per_step']:>9.2f} {row['tokens_per_s']:>9.2f} {row['host_bytes'] / 2**20:>9.1f} "
            f"{row['device_bytes'] / 2**20:>9.1f} {peak:>9} {speedup:>10}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Any) -> None:
    """Milliseconds per decode step against context, one line per method and batch size (PNG)."""
    plt = pyplot()
    settings = report["settings"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"ds_offload": "-", "full_offload": "--", "dense": ":"}
    for method in settings["methods"]:
        for batch in settings["batches"]:
            points = [
                (r["context"], r["ms_per_step"])
                for r in report["rows"]
                if r["method"] == method and r["batch"] == batch and "ms_per_step" in r
            ]
            if points:
                axis.plot(*zip(*points), styles[method], marker="o", label=f"{method}, batch {batch}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("ms per decode step (median)")
    axis.set_title(
        f"decode with K/V offloaded, {settings['config']}, budget {settings['budget']} ({report['device_type']})",
        fontsize=10,
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
