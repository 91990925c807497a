"""The results journal: a JSONL file beside the results JSON, one line per measured sample, written at once.

An interrupted grid keeps every sample it measured, and a grid started again with `--resume` skips the
samples already there. A sample record is keyed by a run key: a hash of everything that decides its
figures (model, channels, task data settings without the sample count, method and its settings, the
sparsity config, seed), so records of another grid in the same file are never taken for this one's, and
a grid grown to more samples reuses the samples it shares (prompts and windows are drawn in order from
the seed, so sample i is the same whatever the count).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

FORMAT = "doublesparse.eval.journal"
# Task settings that only say how many samples there are: left out of the run key.
COUNT_SETTINGS = ("num_samples", "num_windows", "prompt_tokens", "limit")


def run_key(identity: dict[str, Any], task: Any, method: Any, config: Optional[dict[str, Any]]) -> str:
    """The hash naming one (task, method, sparsity config) run of a grid on one model and mask."""
    settings = {k: v for k, v in task.settings().items() if k not in COUNT_SETTINGS}
    if not getattr(method, "needs_channels", False):  # the mask does not decide its figures
        identity = {k: v for k, v in identity.items() if k != "channels"}
    content = {
        "identity": identity,
        "task": task.name,
        "task_settings": settings,
        "method": method.name,
        "method_settings": method.settings(),
        "config": config,
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class Journal:
    """Append-only JSONL of measured samples; `done` holds those read back on resume."""

    def __init__(self, path: Optional[Path], resume: bool = False, header: Optional[dict[str, Any]] = None) -> None:
        self.path = path
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.is_file():
            self.done = read_samples(path)
            logger.info("resuming from %s: %d samples already measured", path, len(self.done))
        else:
            path.write_text("", encoding="utf-8")
        self._append({"record": "grid", "format": FORMAT, **(header or {})})

    def measured(self, key: str, index: int) -> Optional[dict[str, Any]]:
        """The record of sample `index` of run `key`, if it was measured before."""
        return self.done.get((key, index))

    def add_sample(self, key: str, index: int, record: dict[str, Any]) -> None:
        """Write one measured sample now (flushed, so an interruption keeps it)."""
        self.done[(key, index)] = record
        self._append({"record": "sample", "run_key": key, "sample": index, **record})

    def add_result(self, row: dict[str, Any]) -> None:
        """Write an aggregated result (a task's run over all its samples)."""
        self._append({"record": "result", **row})

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()


def read_samples(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The sample records of a journal by (run key, sample); a torn last line (an interrupted write) is skipped."""
    samples: dict[tuple[str, int], dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: the last line is incomplete (an interrupted write): skipped", path)
                continue
            raise ValueError(
                f"{path}:{number} is not a JSON line: the journal is damaged; start without --resume"
            ) from None
        if record.get("record") == "grid" and record.get("format") != FORMAT:
            raise ValueError(f"{path} is not a doublesparse results journal; start without --resume")
        if record.get("record") == "sample":
            samples[(record["run_key"], int(record["sample"]))] = record
    return samples
