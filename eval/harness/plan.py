"""What an evaluation runs, checked before any weights load: typed settings in, a plan out.

`EvalSettings` holds everything `doublesparse eval` and the main job can set; `plan_evaluation`
checks all of it (method and task names, sparsities, config knobs, the channel mask against the
model's config) and returns an `EvalPlan` holding the built tasks and methods, loading no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from doublesparse.config import SparsityConfig


@dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation can set; the defaults are those of `doublesparse eval`."""

    model: str = (
        "bundled"  # see doublesparse.loading: bundled, smollm2, a folder, a .gguf file, a hub id; or tiny-random
    )
    channels: Optional[str] = None  # a mask file, "calibrate", or None: the bundled model's shipped mask
    tasks: tuple[str, ...] = ("perplexity", "kv_retrieval")
    methods: tuple[str, ...] = ("dense", "double_sparsity", "oracle_topk", "streaming_llm", "h2o")
    sparsities: tuple[float, ...] = (1 / 4, 1 / 8, 1 / 16)  # token budgets as fractions of the context
    out_json: Optional[Path] = Path("results.json")
    out_csv: Optional[Path] = None
    out_plot: Optional[Path] = None
    seed: int = 0  # of prompts and of the random-channel ablation
    num_samples: Optional[int] = None  # prompts (retrieval) or examples (lm-eval limit); None: the task's own
    context_length: int = 1024  # retrieval prompt length in tokens
    num_lines: Optional[int] = None  # kv_retrieval: a number of lines instead of a context length
    text: Optional[str] = None  # perplexity text: a file, pydoc-topics:heldout, dataset:NAME[...], None / "bundled"
    window: int = 512
    num_windows: int = 8
    protocol: str = "continuation"  # perplexity: "continuation" (decode-faithful) or "every-position"
    continuation: Optional[int] = None  # perplexity, continuation: tokens scored (None: window // 4, at most 128)
    num_needles: int = 3  # needle: needles in the prose, one asked
    num_channels: int = 16  # r of double_sparsity, random_channels and sparq
    label_bits: int = 4  # SparsityConfig's defaults, here and for sink and recent tokens
    labels: str = "channels"  # double_sparsity labels: "channels" or "projection" (calibrated low-rank)
    kind: Optional[str] = None  # double_sparsity's channel statistic; None: the mask's own
    sink_tokens: int = 4
    recent_tokens: int = 16
    selection: str = "group"
    dense_layers: tuple[int, ...] = ()  # layers every sparse method leaves dense
    page_size: int = 16  # quest
    resume: bool = False  # skip the samples the journal (the JSON path with .jsonl) already holds


@dataclass
class GridSpec:
    """What to evaluate: tasks, methods (built), sparsities, and the base SparsityConfig knobs."""

    tasks: list[Any]
    methods: list[Any]
    sparsities: list[float]
    base_config: SparsityConfig
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalPlan:
    """A checked evaluation: model source, grid, where the channels come from, where outputs go."""

    source: Any
    spec: GridSpec
    channels: Optional[str]  # a mask file, "calibrate", or None when no method needs one
    out_json: Optional[Path]
    out_csv: Optional[Path]
    out_plot: Optional[Path]
    resume: bool = False

    @property
    def out_jsonl(self) -> Optional[Path]:
        """The journal beside the results JSON: every measured sample, written as it is measured."""
        return None if self.out_json is None else self.out_json.with_suffix(".jsonl")


def parse_list(text: str, what: str) -> list[str]:
    """Comma-separated names, stripped, in order, without duplicates; ValueError if empty."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError(f"no {what} given: pass a comma-separated list")
    return names


def method_options(name: str, settings: EvalSettings) -> dict[str, Any]:
    """The registry options of method `name` taken from the settings."""
    if name == "double_sparsity":
        return {"kind": settings.kind}
    if name == "random_channels":
        return {"seed": settings.seed}
    if name == "quest":
        return {"page_size": settings.page_size}
    return {}


def plan_evaluation(settings: EvalSettings) -> EvalPlan:
    """Check every setting and build the plan; ValueError saying what to change. Loads no weights."""
    from ..methods import METHOD_NAMES, make_method
    from ..methods.variants import split_variant
    from ..models.channel_masks import CALIBRATE, load_channel_mask, shipped_mask_path
    from ..models.source import BUNDLED, TINY_RANDOM, resolve_model
    from ..tasks import check_task_name, make_task

    for what, names in (("methods", settings.methods), ("tasks", settings.tasks)):
        if not names:
            raise ValueError(f"no {what} given: pass a comma-separated list")
    for name in settings.methods:
        if split_variant(name)[0] not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; known methods are {', '.join(METHOD_NAMES)}")
    for name in settings.tasks:
        check_task_name(name)
    if not settings.sparsities or not all(0 < value <= 1 for value in settings.sparsities):
        raise ValueError(
            f"sparsities {list(settings.sparsities)} must each lie in (0, 1]: the fraction of the context "
            "each step attends"
        )
    sparsities = sorted(set(settings.sparsities), reverse=True)
    if settings.num_samples is not None and settings.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {settings.num_samples}")
    base_config = SparsityConfig(
        num_channels=settings.num_channels,
        token_budget=1.0,
        label_bits=settings.label_bits,
        labels=settings.labels,
        sink_tokens=settings.sink_tokens,
        recent_tokens=settings.recent_tokens,
        selection=settings.selection,
        dense_layers=tuple(settings.dense_layers),
    )
    built_methods = [make_method(name, **method_options(split_variant(name)[0], settings)) for name in settings.methods]
    options = dict(
        num_samples=settings.num_samples,
        context_length=settings.context_length,
        num_lines=settings.num_lines,
        text=settings.text,
        window=settings.window,
        num_windows=settings.num_windows,
        protocol=settings.protocol,
        continuation=settings.continuation,
        num_needles=settings.num_needles,
    )
    tasks = [make_task(name, **options) for name in settings.tasks]
    for task in tasks:
        check = getattr(task, "check_available", None)
        if check is not None:
            check()
    text = settings.text
    if text not in (None, "bundled") and not str(text).startswith(("dataset:", "pydoc-topics")):
        if not Path(text).is_file():
            raise ValueError(
                f"--text {text!r} is not a file; pass a text file, pydoc-topics:heldout, dataset:NAME[:CONFIG[:SPLIT]] "
                "or bundled"
            )
    if settings.resume and settings.out_json is None:
        raise ValueError("--resume reads the journal beside --out: name the results file with --out")

    source = resolve_model(settings.model, seed=settings.seed)
    layout = source.layout()
    for method in built_methods:
        method.run_config(base_config).check_model(layout.num_layers, layout.head_dim)
    channels = None
    if any(m.needs_channels for m in built_methods):
        channels = settings.channels
        if channels is None and source.name == BUNDLED:
            shipped = shipped_mask_path()
            channels = str(shipped) if shipped else CALIBRATE
        if channels is None:
            raise ValueError(
                "double_sparsity needs a channel mask: pass --channels FILE (make one with "
                "`doublesparse calibrate`) or --channels calibrate"
            )
        if channels == CALIBRATE and not source.trained and source.name != TINY_RANDOM:
            raise ValueError(
                "--channels calibrate uses the bundled calibration text; pass a mask made for this model instead"
            )
        if channels != CALIBRATE:
            mask = load_channel_mask(channels, layout)
            wanting = [
                m.name for m in built_methods if m.needs_channels and m.run_config(base_config).labels == "projection"
            ]
            if wanting and not mask.projection:
                raise ValueError(
                    f"{', '.join(wanting)} label with projections, which the mask {channels!r} does not hold: "
                    "calibrate it again with this version (doublesparse calibrate)"
                )

    spec = GridSpec(
        tasks=tasks, methods=built_methods, sparsities=sparsities, base_config=base_config, seed=settings.seed
    )
    return EvalPlan(source, spec, channels, settings.out_json, settings.out_csv, settings.out_plot, settings.resume)
