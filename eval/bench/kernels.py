"""`doublesparse bench kernels`: one decode-attention step, dense against Double Sparsity, at model shapes.

For each context length it builds random query, keys and values at the chosen attention shape (default
Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128; values do not change speed) and times, on the
same tensors:
- `sdpa`: torch's scaled_dot_product_attention over the whole cache (GQA without repeating K/V);
- `dense`: our dense decode (torch reference on CPU, the Triton flash-decoding kernel on CUDA);
- `double_sparsity` for every budget fraction and label width: label scores + top-k selection +
  sparse attention, with the labels already in the cache (as at decode time), as the runtime runs it
  (`dispatch.fused_decode`: on the CPU one fused native kernel, see fused_decode.py), the three ops
  called one after another (`separate ms`), and each part alone.
Bytes moved are counted from the shapes (the least each op must read and write, see `bytes_moved`);
bandwidth = bytes / median time. On CUDA it also times a plain device copy (the bandwidth ceiling) and
checks that the whole Double Sparsity step captured in a CUDA graph replays to the same output.
Timings interleave the methods round-robin, so load from other processes spreads evenly over them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from doublesparse.kernels.backends import BACKENDS

from ..harness.budgets import parse_budgets
from .common import (
    check_report_outputs,
    parse_contexts,
    pyplot,
    resolve_device,
    save_figure,
    set_threads,
    write_report,
)

HELP = "time dense vs Double Sparsity decode attention: time, bytes moved, bandwidth (table, JSON, plot)"

CPU_CONTEXTS = "4K,8K,16K,32K"
CUDA_CONTEXTS = "4K,8K,16K,32K,64K,128K"
DEFAULT_BUDGETS = "1/4,1/8,1/16,1/32"
DEFAULT_LABEL_BITS = "16,8,4"
FLUSH_BYTES = 256 << 20  # larger than any GPU's L2, so every timed call reads from device memory
COPY_BYTES = 256 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the kernel benchmark."""
    add = parser.add_argument
    add(
        "--contexts",
        help=f"comma-separated cached lengths, K = 1024 (default: {CPU_CONTEXTS} on CPU, {CUDA_CONTEXTS} on CUDA)",
    )
    add("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated budget fractions (default: {DEFAULT_BUDGETS})")
    add(
        "--label-bits", default=DEFAULT_LABEL_BITS, help=f"comma-separated label widths (default: {DEFAULT_LABEL_BITS})"
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--query-heads", type=int, default=32, help="query heads (default: 32, Llama-3.1-8B)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (default: 128)")
    parser.add_argument("--channels", type=int, default=16, help="label channels r (default: 16)")
    parser.add_argument(
        "--selection", default="group", choices=("group", "head"), help="selection per KV group or per query head"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="K/V dtype (default: float16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default: auto)")
    parser.add_argument("--repeats", type=int, help="timed calls per method (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (default: 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tensors and channels")
    parser.add_argument("--out-dir", default="./results/bench-kernels", help="folder for bench_kernels.json and .png")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_bits(text: str) -> list[int]:
    """'16,4' -> [16, 4]."""
    try:
        bits = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--label-bits: {text!r} must be a comma-separated list of 16, 8, 4") from None
    if any(b not in (16, 8, 4) for b in bits):
        raise ValueError(f"--label-bits: allowed widths are 16, 8 and 4, got {text!r}")
    return bits


def bytes_moved(
    kind: str,
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    select_heads: int,
    head_dim: int,
    tokens: int,
    slots: int,
    elt: int,
    label_bytes: int,
) -> int:
    """The least bytes an op must read and write (K/V rows, labels, scores, indices, query and output)."""
    query_out = 2 * batch * q_heads * head_dim * elt
    if kind == "dense":
        return 2 * batch * kv_heads * tokens * head_dim * elt + query_out
    scores = batch * select_heads * tokens * 4  # fp32 scores, written by scoring, read by selection
    indices = batch * select_heads * slots * 8 + batch * slots  # int64 indices + slot_valid
    parts = {
        "scores": label_bytes + scores,
        "select": scores + indices,
        # Each selection head reads its own selected K and V rows (once per KV group when grouped).
        "attention": indices + 2 * batch * max(select_heads, kv_heads) * slots * head_dim * elt + query_out,
    }
    if kind == "step":
        return sum(parts.values())
    return parts[kind]


class Timer:
    """Times callables round-robin: wall clock on CPU, CUDA events (after an L2 flush) on CUDA."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def time_once(self, fn: Callable[[], Any]) -> float:
        """Seconds one call of `fn` takes."""
        import torch

        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def round_robin(
        self, fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, progress: Any = None
    ) -> dict[str, list[float]]:
        """Seconds of every timed call, per name; the methods alternate call by call."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(self.time_once(fn))
            if progress is not None:
                progress.update(1)
        return times


def copy_bandwidth(timer: Timer, repeats: int) -> float:
    """Bytes/s of a plain device-memory copy (read + write), the ceiling for memory-bound kernels."""
    import torch

    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=timer.device)
    target = torch.empty_like(source)
    seconds = timer.round_robin({"copy": lambda: target.copy_(source)}, repeats, 2)["copy"]
    return 2 * COPY_BYTES / statistics.median(seconds)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; write JSON and plot under --out-dir."""
    import torch
    import torch.nn.functional as F

    from doublesparse.config import SparsityConfig
    from doublesparse.huge_pages import on_huge_pages
    from doublesparse.kernels import dispatch
    from doublesparse.kernels.label_append import label_bytes_per_token
    from doublesparse.kernels.label_scores import gather_query_channels
    from doublesparse.policy import row_budgets
    from doublesparse.provenance import device_name, git_commit, versions

    check_report_outputs(args.out_dir, "kernels", plot=not args.no_plot)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    contexts = parse_contexts(args.contexts or (CUDA_CONTEXTS if device.type == "cuda" else CPU_CONTEXTS))
    budgets = parse_budgets(args.budgets, "--budgets")
    label_bits = parse_bits(args.label_bits)
    for name in ("batch", "query_heads", "kv_heads", "head_dim", "channels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.query_heads % args.kv_heads:
        raise ValueError(f"--query-heads {args.query_heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.channels > args.head_dim:
        raise ValueError(f"--channels {args.channels} must be at most --head-dim {args.head_dim}")
    repeats = args.repeats or (50 if device.type == "cuda" else 10)
    if repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be positive and --warmup non-negative")
    set_threads(args.threads)
    backend = dispatch.resolve_backend(args.backend, device)
    configs = [(budget, bits) for budget in budgets for bits in label_bits]
    for budget, bits in configs:  # validate every combination before any timing
        SparsityConfig(
            num_channels=args.channels, token_budget=float(budget), label_bits=bits, selection=args.selection
        )

    batch, q_heads, kv_heads, head_dim = args.batch, args.query_heads, args.kv_heads, args.head_dim
    select_heads = kv_heads if args.selection == "group" else q_heads
    scaling = head_dim**-0.5
    elt = torch.finfo(dtype).bits // 8
    timer = Timer(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    results: list[dict[str, Any]] = []
    graph_checks: list[dict[str, Any]] = []

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(contexts) * repeats, desc="bench kernels", unit="round", file=sys.stderr)
    channel_heads = select_heads if args.selection == "head" else kv_heads
    for tokens in contexts:
        query = torch.randn(batch, q_heads, 1, head_dim, generator=generator).to(device, dtype)
        keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator).to(device, dtype)
        values = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator).to(device, dtype)
        # On the pages the decode cache uses (huge pages on CPU where the system has them; no-op on CUDA).
        keys, values = on_huge_pages(keys), on_huge_pages(values)
        channels = torch.stack(
            [torch.randperm(head_dim, generator=generator)[: args.channels] for _ in range(channel_heads)]
        ).to(device)
        valid = torch.ones(batch, 1, tokens, dtype=torch.bool, device=device)
        lengths = torch.full((batch, 1), tokens, device=device)

        # Default arguments bind this context's tensors to each closure: they are called after the loop (B023).
        fns: dict[str, Callable[[], Any]] = {
            "sdpa": lambda query=query, keys=keys, values=values: F.scaled_dot_product_attention(
                query, keys, values, scale=scaling, enable_gqa=True
            ),
            "dense": lambda query=query, keys=keys, values=values: dispatch.dense_attention(
                query, keys, values, scaling, None, backend
            ),
        }
        steps: dict[tuple[Fraction, int], Callable[[], Any]] = {}
        shapes: dict[tuple[Fraction, int], dict[str, int]] = {}
        for budget, bits in configs:
            config = SparsityConfig(
                num_channels=args.channels,
                token_budget=float(budget),
                label_bits=bits,
                selection=args.selection,
                backend=backend,
            )
            row_budget = row_budgets(config, lengths)
            slots = int(row_budget.max())
            labels = dispatch.make_labels(keys, channels, bits, backend)
            q_labels = gather_query_channels(query, channels)
            scores = dispatch.label_scores(q_labels, labels, bits, scaling, select_heads, backend)
            indices, slot_valid = dispatch.select_tokens(scores, valid, row_budget, 0, 0, slots, backend)
            label_bytes = batch * channels.shape[0] * tokens * label_bytes_per_token(args.channels, bits)
            shapes[(budget, bits)] = {"slots": slots, "label_bytes": label_bytes}

            # Default arguments bind this iteration's tensors: the closures are called after the loop.
            bound = dict(query=query, keys=keys, values=values, channels=channels, valid=valid)

            def step(labels=labels, bits=bits, row_budget=row_budget, slots=slots, bound=bound):
                query, keys, values, channels, valid = bound.values()
                # What the runtime runs: the fused kernel where it serves the call, the three ops otherwise.
                return dispatch.fused_decode(
                    query,
                    keys,
                    values,
                    channels,
                    labels,
                    bits,
                    valid,
                    row_budget,
                    0,
                    0,
                    slots,
                    scaling,
                    select_heads,
                    backend,
                )

            def separate(labels=labels, bits=bits, row_budget=row_budget, slots=slots, bound=bound):
                query, keys, values, channels, valid = bound.values()
                step_scores = dispatch.label_scores(
                    gather_query_channels(query, channels), labels, bits, scaling, select_heads, backend
                )
                step_indices, step_valid = dispatch.select_tokens(step_scores, valid, row_budget, 0, 0, slots, backend)
                return dispatch.sparse_attention(query, keys, values, step_indices, step_valid, scaling, backend)

            def scores_only(q_labels=q_labels, labels=labels, bits=bits):
                return dispatch.label_scores(q_labels, labels, bits, scaling, select_heads, backend)

            def select_only(scores=scores, row_budget=row_budget, slots=slots, valid=valid):
                return dispatch.select_tokens(scores, valid, row_budget, 0, 0, slots, backend)

            def attention_only(indices=indices, slot_valid=slot_valid, bound=bound):
                query, keys, values, _, _ = bound.values()
                return dispatch.sparse_attention(query, keys, values, indices, slot_valid, scaling, backend)

            tag = f"{budget}|{bits}"
            steps[(budget, bits)] = step
            fns[f"step|{tag}"] = step
            fns[f"separate|{tag}"] = separate
            fns[f"scores|{tag}"] = scores_only
            fns[f"select|{tag}"] = select_only
            fns[f"attention|{tag}"] = attention_only

        times = timer.round_robin(fns, repeats, args.warmup, progress)
        common = dict(
            batch=batch,
            q_heads=q_heads,
            kv_heads=kv_heads,
            select_heads=select_heads,
            head_dim=head_dim,
            tokens=tokens,
            elt=elt,
        )
        medians = {name: statistics.median(seconds) for name, seconds in times.items()}
        dense_bytes = bytes_moved("dense", slots=tokens, label_bytes=0, **common)
        for method in ("sdpa", "dense"):
            results.append(_row(tokens, method, None, None, times[method], dense_bytes, medians))
        for budget, bits in configs:
            tag = f"{budget}|{bits}"
            shape = shapes[(budget, bits)]
            moved = bytes_moved("step", **shape, **common)
            row = _row(tokens, "double_sparsity", budget, bits, times[f"step|{tag}"], moved, medians)
            row["slots"] = shape["slots"]
            selected_rows = 2 * batch * max(select_heads, kv_heads) * shape["slots"]
            row["floor_bytes"] = shape["label_bytes"] + selected_rows * head_dim * elt
            row["separate_ms"] = 1e3 * medians[f"separate|{tag}"]
            for part in ("scores", "select", "attention"):
                row[f"{part}_ms"] = 1e3 * medians[f"{part}|{tag}"]
                row[f"{part}_bytes"] = bytes_moved(part, **shape, **common)
            results.append(row)
        if device.type == "cuda":
            graph_checks.append(_cuda_graph_check(tokens, steps[configs[0]], configs[0], repeats))
    if progress is not None:
        progress.close()

    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report = {
        "benchmark": "kernels",
        "settings": {
            **options,
            "contexts": contexts,
            "budgets": [str(b) for b in budgets],
            "label_bits": label_bits,
            "repeats": repeats,
            "dtype": str(dtype).replace("torch.", ""),
            "backend": backend,
            "threads": torch.get_num_threads(),
        },
        "device": {"type": device.type, "name": device_name(device), "cpu_count": os.cpu_count()},
        "versions": versions(),
        "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "copy_bandwidth_gb_s": copy_bandwidth(timer, repeats) / 1e9,
        "results": results,
        "cuda_graph": graph_checks,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, out_dir / "bench_kernels.json")
    print(format_table(report))
    if not args.no_plot:
        plot(report, out_dir / "bench_kernels.png")
    plotted = "" if args.no_plot else f" and {out_dir / 'bench_kernels.png'}"
    print(f"wrote {out_dir / 'bench_kernels.json'}{plotted}")
    if any(not check["equal"] for check in graph_checks):
        print("CUDA graph replay differs from eager execution", file=sys.stderr)
        return 1
    return 0


def _row(
    tokens: int, method: str, budget: Any, bits: Any, seconds: list[float], moved: int, medians: dict[str, float]
) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "context": tokens,
        "method": method,
        "budget": None if budget is None else str(budget),
        "label_bits": bits,
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(seconds),
        "times_ms": [1e3 * s for s in seconds],
        "bytes": moved,
        "gb_s": moved / median / 1e9,
        "speedup_vs_sdpa": medians["sdpa"] / median,
        "speedup_vs_dense": medians["dense"] / median,
    }


def _cuda_graph_check(tokens: int, step: Callable[[], Any], config, repeats: int) -> dict[str, Any]:
    """Capture the whole Double Sparsity step in a CUDA graph; replay must give the eager output."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compile kernels, settle allocations
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    timer = Timer(torch.device("cuda"))
    replay = timer.round_robin({"replay": graph.replay}, repeats, 2)["replay"]
    return {
        "context": tokens,
        "budget": str(config[0]),
        "label_bits": config[1],
        "equal": bool(torch.equal(captured, eager)),
        "max_abs_diff": float((captured.float() - eager.float()).abs().max()),
        "replay_median_ms": 1e3 * statistics.median(replay),
    }


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table."""
    header = (
        "context",
        "method",
        "budget",
        "bits",
        "median ms",
        "min ms",
        "MB moved",
        "GB/s",
        "x SDPA",
        "x dense",
        "separate ms",
        "scores ms",
        "select ms",
        "attn ms",
    )
    lines = []
    for row in report["results"]:
        parts = [row.get(f"{p}_ms") for p in ("separate", "scores", "select", "attention")]
        lines.append(
            (
                str(row["context"]),
                row["method"],
                row["budget"] or "-",
                str(row["label_bits"] or "-"),
                f"{row['median_ms']:.3f}",
                f"{row['min_ms']:.3f}",
                f"{row['bytes'] / 1e6:.1f}",
                f"{row['gb_s']:.2f}",
                f"{row['speedup_vs_sdpa']:.2f}",
                f"{row['speedup_vs_dense']:.2f}",
                *("-" if p is None else f"{p:.3f}" for p in parts),
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: Any) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    settings, device = report["settings"], report["device"]
    title = (
        f"decode attention on {device['name']} ({device['type']}), {settings['dtype']}, "
        f"batch {settings['batch']}, {settings['query_heads']}q/{settings['kv_heads']}kv heads, "
        f"d={settings['head_dim']}, r={settings['channels']}, "
        f"selection={settings['selection']}, backend={settings['backend']}, {settings['repeats']} repeats; "
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s"
    )
    body = [title, render(header), render(["-" * w for w in widths])] + [render(line) for line in lines]
    for check in report["cuda_graph"]:
        verdict = "equals" if check["equal"] else "DIFFERS from"
        body.append(
            f"CUDA graph at {check['context']} tokens: replay {verdict} eager, "
            f"{check['replay_median_ms']:.3f} ms per replay"
        )
    return "\n".join(body)


def plot(report: dict[str, Any], path: Path) -> None:
    """Median time against context: SDPA, dense, and Double Sparsity per budget; one panel per label width."""
    plt = pyplot()
    rows = report["results"]
    bits_list = report["settings"]["label_bits"]
    figure, axes = plt.subplots(1, len(bits_list), figsize=(5 * len(bits_list), 4), squeeze=False, sharey=True)
    for axis, bits in zip(axes[0], bits_list):
        dense_label = f"dense, ours ({report['settings']['backend']})"
        for method, style, label in (("sdpa", "k--", "dense, torch SDPA"), ("dense", "k-", dense_label)):
            points = [(r["context"], r["median_ms"]) for r in rows if r["method"] == method]
            axis.plot(*zip(*points), style, marker="o", label=label)
        for budget in report["settings"]["budgets"]:
            points = [
                (r["context"], r["median_ms"])
                for r in rows
                if r["method"] == "double_sparsity" and r["budget"] == budget and r["label_bits"] == bits
            ]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"DS budget {budget}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_title(f"{bits}-bit labels")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time per decode step (ms)")
    axes[0][-1].legend(fontsize=8)
    settings = report["settings"]
    figure.suptitle(
        f"decode attention, {report['device']['name']}, {settings['dtype']}, batch {settings['batch']}", fontsize=10
    )
    save_figure(figure, path)
