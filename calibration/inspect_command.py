"""`doublesparse inspect`: per-layer, per-head concentration of a channel mask, and a heatmap of channel importance."""

from __future__ import annotations

import argparse

HELP = "show how concentrated the channels of a calibrated mask are, and plot their importance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the inspect command."""
    parser.add_argument("channels", help="channel mask (.safetensors, or the authors' .json)")
    parser.add_argument("--r", type=int, default=16, help="channels kept per head (default: 16)")
    parser.add_argument(
        "--kind", choices=("q", "k", "qk"), help="statistic to show (default: the one the mask is ranked by)"
    )
    parser.add_argument("--per-kv", action="store_true", help="one row per KV head (statistics summed over each group)")
    parser.add_argument("--plot", help="save a heatmap of channel importance to this image file (png, pdf, svg)")
    parser.add_argument("--layer", type=int, help="with --plot: plot only this layer (heads x channels)")


def run(args: argparse.Namespace) -> int:
    """Print the tables; save the plot."""
    from doublesparse.calibration.report import (
        concentration_summary,
        head_table,
        plot_importance,
        radii_for,
        top_channels_table,
    )
    from doublesparse.channels import ChannelMask
    from doublesparse.output_paths import check_image_file

    if args.plot:
        check_image_file(args.plot, "--plot")
    elif args.layer is not None:
        raise ValueError("--layer picks the layer to plot: add --plot FILE (the tables always show every layer)")
    mask = ChannelMask.load(args.channels, kind=args.kind)
    pinned = f"content sha256 {mask.source_hash} ({mask.source_hash_note})"  # of the file, before any view
    if not 1 <= args.r <= mask.head_dim:
        raise ValueError(f"--r must be in [1, {mask.head_dim}] (the head_dim), got {args.r}")
    if args.layer is not None and not 0 <= args.layer < mask.num_layers:
        raise ValueError(f"--layer must be in [0, {mask.num_layers}), got {args.layer}")
    if args.per_kv:
        mask = mask.per_kv()
    layout = mask.layout
    settings = mask.calibration
    rows = "KV heads" if mask.per_kv_head else "heads"
    shape = f"{mask.num_layers} layers x {mask.num_heads} {rows} x {mask.head_dim} channels"
    print(f"{args.channels}: {mask.kind} ranking, {shape}")
    print(f"  {pinned}")
    if layout.name:
        print(f"  model {layout.name} ({layout.model_type})")
    if settings.get("tokens"):
        print(
            f"  calibrated on {settings.get('source')}: "
            f"{settings.get('num_samples')} x {settings.get('seq_len')} tokens, "
            f"seed {settings.get('seed')}, RoPE pairs kept: {settings.get('keep_rope_pairs', False)}"
        )
    if mask.kind in mask.statistics:
        print(f"\nshare of the {mask.kind} statistic in the top {args.r} channels, per head:")
        print(head_table(mask, args.r))
        print("\nmean over heads:")
        print(concentration_summary(mask, sorted(set(radii_for(mask.head_dim)) | {args.r})))
    else:
        print("\nthis mask stores no statistics (concentration needs them); top channels per head:")
        print(top_channels_table(mask, args.r))
    if args.plot:
        plot_importance(mask, args.plot, layer=args.layer)
        print(f"\nwrote {args.plot}")
    return 0
