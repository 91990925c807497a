"""`doublesparse bench decode`: end-to-end decode speed, dense against Double Sparsity, at model shapes.

For each context length and batch size it builds the model at real shapes with random weights (no
download; speed does not depend on weight values), fills a preallocated cache with `context` tokens,
and times greedy decode steps of the same `StaticDecoder` loop twice: unpatched (transformers'
StaticCache, dense SDPA) and patched with Double Sparsity (StaticDoubleSparseCache). The cache is
filled either by a real prefill (`--prefill model`) or, by default, by writing random keys and
values of the model's shape straight into it (`--prefill synthetic`), which makes long contexts
affordable on a CPU; labels are computed from those keys exactly as at decode time.
Reported per row: ms per step and tokens/s (medians over the timed steps), the process CPU time per
step and its dense / Double Sparsity ratio (with --threads 1 a measure of the work that the machine's
other load does not inflate; see time_steps), cache memory, peak device
memory on CUDA, the bytes the step must move (step_bytes.py: weights once, K/V or labels and the
selected K/V, per layer, batch included) and the bandwidth that makes; per Double Sparsity row the
measured speed-up over dense, the byte floor's speed-up (dense bytes / Double Sparsity bytes) and the
measured one as a share of it. The header gives the device's read bandwidth (a 1 GiB sum on CPU, a
copy on CUDA), against which the dense row's bandwidth says whether the dense baseline itself runs at
the memory's speed (a slow baseline inflates every speed-up); beside it, the rate at which the native
kernels' access pattern reads K/V rows at random positions (`row_read_bandwidth`), the ceiling of
Double Sparsity's selected-row reads, which the byte floor counts at the streaming rate; the "rows
floor" is the byte floor with those rows at that rate (`row_floor_speedup`), and its share. Weights and
both caches sit on the same pages (huge pages where the system gives them, huge_pages.py); each row
records the process's huge-page bytes. `--breakdown` adds where the time of a
step goes (step_breakdown.py), from extra steps run under timers. JSON with every setting, and a plot.
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
from .step_breakdown import LABELS, STAGES, stage_milliseconds, stage_timers
from .step_bytes import step_bytes

DTYPES = ("float32", "float16", "bfloat16")

HELP = "time end-to-end decode steps, dense vs Double Sparsity, on models built at real shapes (JSON, plot)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the decode benchmark."""
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
        help="comma-separated cached lengths, K = 1024 (default: 8K,32K,128K on CUDA, 32K on CPU)",
    )
    add("--batch", default=None, help="comma-separated batch sizes (default: 1,8 on CUDA, 1 on CPU)")
    add("--budget", default="1/16", help="token budget fraction (default: 1/16)")
    add("--channels", type=int, default=16, help="label channels r (default: 16)")
    add("--label-bits", type=int, default=4, choices=(16, 8, 4), help="label width (default: 4)")
    add("--selection", default="group", choices=("group", "head"), help="selection per KV group or per query head")
    add("--steps", type=int, default=8, help="timed decode steps per method (default: 8)")
    add("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    add(
        "--prefill",
        default="synthetic",
        choices=("synthetic", "model"),
        help="how the cache is filled (default: synthetic)",
    )
    add(
        "--dtype",
        default=None,
        help="comma-separated weights and cache dtypes of float32, float16, bfloat16 "
        "(default: bfloat16 on CUDA, float32,bfloat16 on CPU)",
    )
    add("--device", help="cpu or cuda (default: cuda when available)")
    add("--backend", default="auto", choices=BACKENDS, help="kernel backend (default: auto)")
    add(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs with --compile-mode reduce-overhead)",
    )
    add("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    add(
        "--freeze",
        action="store_true",
        help="with --compile: inductor freezing (weights folded in as constants; on CPU the linear layers run "
        "oneDNN on prepacked weights), for both methods",
    )
    add("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of weights, caches and channels")
    add("--out-dir", default="./results/bench-decode", help="folder for bench_decode.json and .png")
    add(
        "--breakdown",
        action="store_true",
        help="also time where each step goes (model ops, cache update, attention, the rest) over extra steps",
    )
    add("--no-plot", action="store_true", help="skip the plot")
    add("--no-progress", action="store_true", help="hide the progress bar")


def fill_cache(model: Any, decoder: Any, cache: Any, batch: int, context: int, prefill: str, seed: int) -> Any:
    """Put `context` tokens in `cache`; return the last logits [B, V] and the mask buffer."""
    import torch

    from doublesparse import HeadLayout

    device = next(model.parameters()).device
    if prefill == "model":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
        return decoder.prefill(ids, torch.ones_like(ids), cache)
    # Drawn on the device: tens of GB of K/V drawn on the host would take longer than the benchmark.
    generator = torch.Generator(device=device).manual_seed(seed)
    layout = HeadLayout.from_config(model.config)
    dtype = next(model.parameters()).dtype
    chunk = 4096
    for layer_idx in range(layout.num_layers):
        for start in range(0, context, chunk):
            span = min(chunk, context - start)
            shape = (2, batch, layout.num_kv_heads, span, layout.head_dim)
            keys, values = torch.randn(shape, generator=generator, device=device).to(dtype)
            cache.update(keys, values, layer_idx)
    mask = torch.zeros(batch, decoder.max_cache_len, dtype=torch.long, device=device)
    mask[:, :context] = 1
    logits = torch.randn(batch, model.config.vocab_size, generator=generator, device=device)
    return logits, mask


def time_steps(
    decoder: Any,
    cache: Any,
    mask: Any,
    logits: Any,
    context: int,
    steps: int,
    warmup: int,
    synchronize: Callable[[], None],
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed decode step (after `warmup` untimed ones).

    CPU time counts every thread of the process while it runs, spin-waits included: with one thread
    it is the step's own work, whatever else the machine runs, where the wall clock also counts the
    time the system gave the core to others.
    """
    positions = mask[:, :context].long().sum(-1, keepdim=True)
    walls, cpus = [], []
    for step in range(warmup + steps):
        token = logits.argmax(-1, keepdim=True)
        synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        logits = decoder.step(cache, mask, token, context + step, positions + step)
        synchronize()
        if step >= warmup:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    return walls, cpus


def breakdown_steps(
    model: Any,
    decoder: Any,
    cache: Any,
    mask: Any,
    logits: Any,
    position: int,
    steps: int,
    synchronize: Callable[[], None],
) -> dict[str, float]:
    """Median ms per stage (step_breakdown.STAGES) over `steps` more steps, run under timers."""
    positions = mask[:, :position].long().sum(-1, keepdim=True)
    per_step = []
    with stage_timers(model, cache) as seconds:
        for step in range(steps):
            token = logits.argmax(-1, keepdim=True)
            seconds.clear()
            synchronize()
            start = time.perf_counter()
            logits = decoder.step(cache, mask, token, position + step, positions + step)
            synchronize()
            per_step.append(stage_milliseconds(seconds, time.perf_counter() - start))
    return {stage: statistics.median(ms[stage] for ms in per_step) for stage in STAGES}


def freezing(enabled: bool) -> Any:
    """A context in which inductor freezes what it compiles (weights as constants), or a no-op."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


def parse_dtypes(text: str) -> list[str]:
    """'float32,bfloat16' -> ['float32', 'bfloat16']; ValueError naming --dtype otherwise."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise ValueError(f"--dtype: {', '.join(unknown) or text!r} not one of {', '.join(DTYPES)}")
    return names


def read_bandwidth(device: Any, repeats: int = 5) -> float:
    """Bytes/s the device reads at: the best of `repeats` 1 GiB sums (CPU) or 1 GiB copies (CUDA, read + write)."""
    import torch

    from doublesparse.huge_pages import on_huge_pages

    synchronize = synchronizer(device)
    # On the same pages as the benchmark's weights and caches (on CPU: huge pages where the system has them).
    source = on_huge_pages(torch.ones(1 << 28, dtype=torch.float32, device=device))
    target = torch.empty_like(source) if device.type == "cuda" else None
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        source.sum() if target is None else target.copy_(source)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return (1 if target is None else 2) * source.numel() * 4 / best


# The random-row probe reads this much from a buffer of PROBE_BUFFER_BYTES (well past any cache).
PROBE_READ_BYTES = 64 << 20
PROBE_BUFFER_BYTES = 2 << 30


def row_read_bandwidth(row_bytes: int, repeats: int = 5) -> Optional[float]:
    """Bytes/s at which the native sparse attention's access pattern reads `row_bytes`-byte rows at random.

    The best of `repeats` reads of PROBE_READ_BYTES, fresh rows each time, from a buffer on the pages the
    caches use; None where the native kernels are not built. The ceiling of Double Sparsity's K/V reads
    on this machine, where the byte floor counts every byte at the streaming rate.
    """
    import torch

    from doublesparse.huge_pages import huge_page_zeros
    from doublesparse.kernels import native, native_ops

    if native.native_limits() is None:
        return None
    buffer = huge_page_zeros((PROBE_BUFFER_BYTES // row_bytes, row_bytes), torch.uint8)
    generator = torch.Generator().manual_seed(0)
    count = PROBE_READ_BYTES // row_bytes
    best = float("inf")
    for _ in range(repeats + 1):
        rows = torch.randint(0, buffer.shape[0], (count,), generator=generator)
        start = time.perf_counter()
        native_ops.read_rows(buffer, rows, row_bytes)
        best = min(best, time.perf_counter() - start)
    return count * row_bytes / best


def row_floor_speedup(dense: dict[str, int], sparse: dict[str, int], bandwidth: float, row_rate: float) -> float:
    """The byte floor's speed-up with Double Sparsity's selected K/V rows read at `row_rate` instead of `bandwidth`.

    dense and sparse: step_bytes of each method; dense reads its K/V in sequence, at the streaming rate.
    """
    sparse_seconds = (sparse["total"] - sparse["kv"]) / bandwidth + sparse["kv"] / row_rate
    return dense["total"] / bandwidth / sparse_seconds


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write JSON and the plot."""
    import torch
    from tqdm import tqdm

    import doublesparse as ds
    from doublesparse.cache import kv_on_huge_pages
    from doublesparse.decode import StaticDecoder
    from doublesparse.huge_pages import huge_page_mode, module_on_huge_pages, process_huge_page_bytes
    from doublesparse.plan import layer_plans
    from doublesparse.provenance import provenance

    check_report_outputs(args.out_dir, "decode", plot=not args.no_plot)
    if args.compile_mode is not None and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode!r} is a mode of torch.compile: add --compile")
    device = resolve_device(args.device)
    preset = args.config or ("llama-3.1-8b" if device.type == "cuda" else "llama-8l-cpu")
    contexts = parse_contexts(args.context or ("8K,32K,128K" if device.type == "cuda" else "32K"), "--context")
    batches = positive_ints(args.batch or ("1,8" if device.type == "cuda" else "1"), "--batch")
    dtypes = parse_dtypes(args.dtype or ("bfloat16" if device.type == "cuda" else "float32,bfloat16"))
    budget = parse_budget(args.budget, "--budget")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.freeze and not args.compile:
        raise ValueError("--freeze applies to a compiled step: add --compile")
    if args.breakdown and args.compile:
        raise ValueError("--breakdown times the modules of eager steps (a compiled step has none): drop --compile")
    set_threads(args.threads)
    config = ds.SparsityConfig(
        num_channels=args.channels,
        token_budget=float(budget),
        label_bits=args.label_bits,
        selection=args.selection,
        backend=args.backend,
    )
    synchronize = synchronizer(device)
    bandwidth = read_bandwidth(device)
    row_rates: dict[str, Optional[float]] = {}

    rows = []
    cases = [(dtype, context, batch) for dtype in dtypes for context in contexts for batch in batches]
    progress = tqdm(total=2 * len(cases), desc="bench decode", disable=args.no_progress)
    model = None
    weights_on_huge_pages: dict[str, int] = {}
    for dtype_name, context, batch in cases:
        dtype = getattr(torch, dtype_name)
        if model is None or next(model.parameters()).dtype != dtype:
            del model
            model = presets.build_model(preset, dtype, device, args.seed)
            # The Double Sparsity cache puts its CPU buffers on huge pages (cache.kv_on_huge_pages); the
            # shared weights and the dense cache get them too, so both methods run on the same memory.
            weights_on_huge_pages[dtype_name] = module_on_huge_pages(model)
            layout = ds.HeadLayout.from_config(model.config)
            if device.type == "cpu":
                row_rates[dtype_name] = row_read_bandwidth(layout.head_dim * dtype.itemsize)
            config.check_model(layout.num_layers, layout.head_dim)
            mask = random_channel_mask(layout, args.seed)
            plans = layer_plans(mask, config, layout)
        max_len = context + args.warmup + args.steps + 2 + (3 if args.breakdown else 0)
        measured, cpu_measured, moved = {}, {}, {}
        for method in ("dense", "double_sparsity"):
            if method == "double_sparsity":
                ds.apply(model, mask, config)
            try:
                decoder = StaticDecoder(model, max_len, compile=args.compile, compile_mode=args.compile_mode)
                cache = decoder.new_cache()
                if method == "dense" and device.type == "cpu":
                    layout_kv = (batch, layout.num_kv_heads, layout.head_dim, dtype, device)
                    cache.early_initialization(*layout_kv)
                    for layer in cache.layers:
                        kv_on_huge_pages(layer)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                logits, buffer = fill_cache(model, decoder, cache, batch, context, args.prefill, args.seed)
                with freezing(args.freeze):  # inductor reads it when the first step compiles
                    seconds, cpu_seconds = time_steps(
                        decoder, cache, buffer, logits, context, args.steps, args.warmup, synchronize
                    )
                memory = cache.memory() if hasattr(cache, "memory") else _static_cache_bytes(cache)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                huge_bytes = process_huge_page_bytes() if device.type == "cpu" else None
                stages = None
                if args.breakdown:
                    stages = breakdown_steps(
                        model, decoder, cache, buffer, logits, context + args.warmup + args.steps, 3, synchronize
                    )
            finally:
                if method == "double_sparsity":
                    ds.remove(model)
            del cache, decoder
            if args.compile:
                # Compiled code keeps what it was traced with (with freezing, the cache's buffers become
                # constants): drop it, or the next method's cache would sit beside this one's.
                torch._dynamo.reset()
            step = statistics.median(seconds)
            measured[method] = step
            cpu_measured[method] = statistics.median(cpu_seconds)
            moved[method] = step_bytes(model, layout, plans, config, method, batch, context, dtype.itemsize)
            row = {
                "dtype": dtype_name,
                "context": context,
                "batch": batch,
                "method": method,
                "ms_per_step": 1e3 * step,
                "tokens_per_s": batch / step,
                "step_seconds": seconds,
                "cpu_ms_per_step": 1e3 * cpu_measured[method],
                "step_cpu_seconds": cpu_seconds,
                "cache_bytes": memory,
                "peak_device_bytes": peak,
                "process_huge_page_bytes": huge_bytes,
                "step_bytes": moved[method],
                "gb_s": moved[method]["total"] / step / 1e9,
            }
            if stages is not None:
                row["breakdown_ms"] = stages
            rows.append(row)
            progress.update(1)
        speedup = measured["dense"] / measured["double_sparsity"]
        floor = moved["dense"]["total"] / moved["double_sparsity"]["total"]
        cpu_speedup = cpu_measured["dense"] / cpu_measured["double_sparsity"]
        rows[-1].update(
            speedup_vs_dense=speedup, floor_speedup=floor, share_of_floor=speedup / floor, cpu_speedup=cpu_speedup
        )
        row_rate = row_rates.get(dtype_name)
        if row_rate is not None:
            row_floor = row_floor_speedup(moved["dense"], moved["double_sparsity"], bandwidth, row_rate)
            rows[-1].update(row_floor_speedup=row_floor, share_of_row_floor=speedup / row_floor)
    progress.close()

    report = {
        "benchmark": "decode",
        "settings": {
            "config": preset,
            "model_shape": presets.PRESETS[preset][1],
            "contexts": contexts,
            "batches": batches,
            "dtypes": dtypes,
            "budget": str(budget),
            "sparsity_config": config.to_dict(),
            "steps": args.steps,
            "warmup": args.warmup,
            "prefill": args.prefill,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
        },
        "huge_pages": {"mode": huge_page_mode(), "weight_bytes": weights_on_huge_pages},
        **provenance(device),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        # Per dtype: K/V rows of head_dim elements read at random (the native kernels' pattern), GB/s.
        "row_read_gb_s": {name: None if rate is None else rate / 1e9 for name, rate in row_rates.items()},
        "rows": rows,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, out_dir / "bench_decode.json")
    print(format_table(report))
    if not args.no_plot:
        plot(report, out_dir / "bench_decode.png")
    print(f"wrote {out_dir / 'bench_decode.json'}")
    return 0


def _static_cache_bytes(cache: Any) -> dict[str, int]:
    keys, values = cache_kv_bytes(cache)
    return {"keys": keys, "values": values, "labels": 0, "total": keys + values}


def _huge_pages_note(report: dict[str, Any]) -> str:
    pages = report.get("huge_pages")
    note = "" if pages is None else f", THP mode {pages['mode']}"
    rates = [f"{name} {rate:.1f}" for name, rate in report.get("row_read_gb_s", {}).items() if rate is not None]
    return note + (f"; K/V rows read at random: {', '.join(rates)} GB/s" if rates else "")


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table (and the breakdown, where it was measured)."""
    settings = report["settings"]
    lines = [
        f"decode benchmark: {settings['config']}, budget {settings['budget']}, "
        f"r={settings['sparsity_config']['num_channels']}, {settings['sparsity_config']['label_bits']}-bit labels, "
        f"prefill {settings['prefill']}, {settings['threads']} threads, device {report['device']}, "
        f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s{_huge_pages_note(report)}",
        f"{'dtype':>8} {'context':>8} {'batch':>5} {'method':<16} {'ms/step':>9} {'tokens/s':>9} {'cache MB':>9} "
        f"{'THP MB':>8} {'MB/step':>8} {'GB/s':>6} {'speed-up':>8} {'floor':>6} {'share':>6} "
        f"{'rows fl':>7} {'share':>6} {'cpu ms':>9} {'cpu x':>6}",
    ]
    for row in report["rows"]:
        speedup = f"{row['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in row else ""
        floor = f"{row['floor_speedup']:.2f}x" if "floor_speedup" in row else ""
        share = f"{100 * row['share_of_floor']:.0f}%" if "share_of_floor" in row else ""
        cpu_speedup = f"{row['cpu_speedup']:.2f}x" if "cpu_speedup" in row else ""
        row_floor = f"{row['row_floor_speedup']:.2f}x" if "row_floor_speedup" in row else ""
        row_share = f"{100 * row['share_of_row_floor']:.0f}%" if "share_of_row_floor" in row else ""
        huge = row.get("process_huge_page_bytes")
        huge = "-" if huge is None else f"{huge / 2**20:.0f}"
        lines.append(
            f"{row['dtype']:>8} {row['context']:>8} {row['batch']:>5} {row['method']:<16} {row['ms_per_step']:>9.2f} "
            f"{row['tokens_per_s']:>9.2f} {row['cache_bytes']['total'] / 2**20:>9.1f} "
            f"{huge:>8} {row['step_bytes']['total'] / 1e6:>8.1f} {row['gb_s']:>6.2f} {speedup:>8} {floor:>6} "
            f"{share:>6} {row_floor:>7} {row_share:>6} {row['cpu_ms_per_step']:>9.2f} {cpu_speedup:>6}"
        )
    broken_down = [row for row in report["rows"] if "breakdown_ms" in row]
    if broken_down:
        lines.append("where a step goes (ms, median of the breakdown steps):")
        names = " ".join(f"{LABELS[stage]:>9}" for stage in STAGES)
        lines.append(f"{'dtype':>8} {'context':>8} {'batch':>5} {'method':<16} {names}")
        for row in broken_down:
            stages = " ".join(f"{row['breakdown_ms'][s]:>9.2f}" for s in STAGES)
            lines.append(f"{row['dtype']:>8} {row['context']:>8} {row['batch']:>5} {row['method']:<16} {stages}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Tokens/s against context, one line per method and batch size."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for dtype in report["settings"]["dtypes"]:
        for batch in report["settings"]["batches"]:
            for method in ("dense", "double_sparsity"):
                points = [
                    (r["context"], r["tokens_per_s"])
                    for r in report["rows"]
                    if r["batch"] == batch and r["method"] == method and r["dtype"] == dtype
                ]
                if points:
                    axis.plot(*zip(*points), marker="o", label=f"{method}, batch {batch}, {dtype}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("tokens/s")
    settings = report["settings"]
    axis.set_title(f"decode speed, {settings['config']}, budget {settings['budget']} ({report['device_type']})")
    axis.legend()
    save_figure(figure, path)
