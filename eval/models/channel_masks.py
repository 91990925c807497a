"""Where an evaluation's channel mask comes from: shipped beside the bundled model, a file, or calibrated now."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from doublesparse.channels import ChannelMask
from doublesparse.layout import HeadLayout

from .source import ModelSource

# Names a calibrated mask may carry inside the bundled model's folder.
SHIPPED_MASK_NAMES = ("channels.safetensors", "channel_mask.safetensors", "channels_qk.safetensors")
CALIBRATION_TEXT = "doublesparse/assets/default_model/calibration.txt"
CALIBRATE = "calibrate"  # the channel source that calibrates on the bundled calibration text


def shipped_mask_path() -> Optional[Path]:
    """A calibrated channel mask shipped beside the bundled model, if any."""
    from doublesparse.default_model import default_model_path

    for name in SHIPPED_MASK_NAMES:
        path = default_model_path() / name
        if path.is_file():
            return path
    return None


def load_channel_mask(path: str, layout: HeadLayout) -> ChannelMask:
    """Load a channel mask file and check it fits `layout`; ValueError saying what to do otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"channel mask {path!r} does not exist; make one with `doublesparse calibrate`")
    mask = ChannelMask.load(path, layout=layout)
    mask.validate(layout)
    return mask


def calibrate_channels(
    model: torch.nn.Module,
    tokenizer: Any,
    num_samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ChannelMask, dict[str, Any]]:
    """Calibrate on the bundled calibration text (disjoint from the held-out text): (mask, description)."""
    from doublesparse.calibration import calibrate
    from doublesparse.default_model import default_calibration_text

    text = default_calibration_text()
    mask = calibrate(
        model,
        tokenizer,
        [text],
        kind="qk",
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        progress=progress,
        source=CALIBRATION_TEXT,
    )
    description = {
        "source": "calibrated now",
        "text": CALIBRATION_TEXT,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
        "kind": "qk",
    }
    return mask, description


def obtain_channel_mask(
    channels: Optional[str],
    source: ModelSource,
    model: torch.nn.Module,
    tokenizer: Any,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Optional[ChannelMask], dict[str, Any]]:
    """(mask, description) for a checked channel source: a mask file, `calibrate`, or None (no mask needed)."""
    if channels == CALIBRATE:
        # A random-weight stand-in gains nothing from a long calibration.
        sizes = {"num_samples": 32, "seq_len": 512} if source.trained else {"num_samples": 8, "seq_len": 256}
        return calibrate_channels(model, tokenizer, seed=seed, progress=progress, **sizes)
    if channels is None:
        return None, {"source": None}
    mask = load_channel_mask(channels, source.layout())
    return mask, {"source": channels, "kind": mask.kind, "calibration": mask.calibration}
