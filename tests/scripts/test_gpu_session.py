"""scripts/gpu_session.sh, without a GPU: its dry run's budget and commands, and its timeouts at work.

The script is meant for one command of under 9 minutes on a GPU machine that this machine never sees.
What can be checked here: the plan's limits (plus kill graces and the script's reserve) sum to at most
9 minutes; every `doublesparse` command it names parses with the real CLI parser (so no option was
renamed under it); the pytest commands name files and markers that exist; the benchmarks cover the
targets' shapes; and, with a plan of our own, a section that overruns is stopped at its limit while
the next one still runs and the summary says so.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doublesparse.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
NINE_MINUTES = 540


def dry_run(tmp_path: Path) -> tuple[list[tuple[str, int, str]], int]:
    """The plan's sections (name, limit in s, command) and the budget the dry run reports."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sections, budget = [], None
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if fields[0] == "PLAN" and fields[1] != "name":
            sections.append((fields[1], int(fields[2]), fields[3]))
        elif fields[0] == "BUDGET":
            budget = int(fields[1])
    assert not (tmp_path / "out").exists()  # a dry run runs nothing and writes nothing
    return sections, budget


def test_the_dry_run_budget_sums_to_under_nine_minutes(tmp_path):
    sections, budget = dry_run(tmp_path)
    assert sections and budget is not None
    assert sum(limit for _, limit, _ in sections) + 5 * len(sections) <= budget <= NINE_MINUTES


def test_every_command_of_the_plan_exists_and_parses(tmp_path):
    sections, _ = dry_run(tmp_path)
    parser = build_parser()
    benches = []
    for name, _, command in sections:
        words = shlex.split(command.replace("$XDIST", ""))
        if "doublesparse.cli" in words:
            argv = words[words.index("doublesparse.cli") + 1 :]
            args = parser.parse_args(argv)  # an unknown or renamed option exits with status 2 here
            assert args.command == "bench", name
            benches.append((args.benchmark, args))
        elif "pytest" in words:
            paths = [word for word in words if word.startswith("tests")]
            assert paths and all((ROOT / path).exists() for path in paths), name
            options = words[words.index("pytest") + 1 :]
            markers = options[options.index("-m") + 1]
            assert "gpu" in markers and "gpu:" in (ROOT / "pytest.ini").read_text()
    assert [name for name, _, _ in sections].index("tests-gpu") < [name for name, _, _ in sections].index(
        "bench-kernels"
    )  # the parity tests first
    kinds = {kind for kind, _ in benches}
    assert kinds == {"kernels", "decode", "offload"}
    # The targets' shapes (docs/benchmarks.md): kernels at batch 8 up to 64K and beyond, Llama-3.1-8B-shaped
    # decode at batch 8 and 32K and at 128K, offload at 256K against the full-KV baseline.
    kernels = next(args for kind, args in benches if kind == "kernels")
    assert kernels.batch == 8 and "64K" in kernels.contexts and "128K" in kernels.contexts
    decodes = [args for kind, args in benches if kind == "decode"]
    assert all(args.config == "llama-3.1-8b" for args in decodes)
    assert any(args.context == "32K" and args.batch == "8" and args.compile for args in decodes)
    assert any(args.context == "128K" for args in decodes)
    offload = next(args for kind, args in benches if kind == "offload")
    assert offload.context == "256K" and set(offload.methods.split(",")) >= {"ds_offload", "full_offload"}


def test_a_section_that_overruns_is_stopped_at_its_limit_and_the_next_still_runs(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("slow|1|sleep 30\nnext|10|echo the next section ran\nbroken|5|exit 3\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_PLAN": str(plan)}
    began = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - began < 20  # the 30 s sleep was cut at its 1 s limit
    assert result.returncode == 0, result.stderr
    summary = (out / "summary.md").read_text()
    assert "| slow | 1 |" in summary and "stopped at its limit" in summary
    assert "| next | 10 |" in summary and "| broken | 5 |" in summary and "failed (exit 3)" in summary
    assert "the next section ran" in (out / "log.txt").read_text()
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8  # what the device runner brings back


@pytest.mark.parametrize("limit", [600])
def test_a_plan_over_the_budget_is_refused_before_anything_runs(tmp_path, limit):
    plan = tmp_path / "plan.txt"
    plan.write_text(f"long|{limit}|echo should not run\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SESSION_PLAN": str(plan)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "exceed the budget" in result.stderr
    assert not (tmp_path / "out").exists()
