"""One primitive for running a model's attention through a function of ours, and for undoing it.

transformers calls the function registered under the model's attention implementation name with each
attention module as its first argument. Patching is therefore: register the function (and SDPA's mask
builder, without which the mask is always None) under a name, give each attention module the object
the function reads from it (a layer plan, a statistics recorder), switch the model to that name, and
keep whatever hooks the caller adds. `AttentionPatch.restore` undoes exactly that, in reverse. The
runtime (`doublesparse.apply`), the evaluation baselines and calibration capture all patch this way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask


@dataclass
class AttentionPatch:
    """What one `patch_attention` changed on a model, so that `restore` can undo it."""

    model: torch.nn.Module
    name: str
    attribute: str
    previous_implementation: Optional[str]
    modules: list[torch.nn.Module] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)

    def is_active(self) -> bool:
        """Whether the model still runs the patched attention (someone may have switched it since)."""
        return self.model.config._attn_implementation == self.name

    def restore(self) -> None:
        """Remove the hooks and per-module objects, and switch back to the previous implementation."""
        for hook in reversed(self.hooks):
            hook.remove()
        self.hooks.clear()
        for module in self.modules:
            if hasattr(module, self.attribute):
                delattr(module, self.attribute)
        self.modules.clear()
        if self.is_active():
            self.model.set_attn_implementation(self.previous_implementation or "sdpa")


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Register `function` and SDPA's mask builder under `name` with transformers (idempotent)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def patch_attention(
    model: torch.nn.Module,
    name: str,
    function: Callable[..., Any],
    attribute: str,
    per_module: Mapping[torch.nn.Module, Any],
    setup: Optional[Callable[[AttentionPatch], None]] = None,
) -> AttentionPatch:
    """Make `model` attend through `function`; each module of `per_module` gets its value as `attribute`.

    `setup(patch)` runs before the switch and may add hooks to `patch.hooks`; on any error everything
    done so far is undone and the error raised.
    """
    register_attention(name, function)
    patch = AttentionPatch(model, name, attribute, model.config._attn_implementation)
    try:
        for module, value in per_module.items():
            setattr(module, attribute, value)
            patch.modules.append(module)
        if setup is not None:
            setup(patch)
        model.set_attn_implementation(name)
    except BaseException:
        patch.restore()
        raise
    return patch


@contextlib.contextmanager
def attention_patched(
    model: torch.nn.Module,
    name: str,
    function: Callable[..., Any],
    attribute: str,
    per_module: Mapping[torch.nn.Module, Any],
) -> Iterator[AttentionPatch]:
    """Context-manager form of `patch_attention`: restored on exit, also on error."""
    patch = patch_attention(model, name, function, attribute, per_module)
    try:
        yield patch
    finally:
        patch.restore()
