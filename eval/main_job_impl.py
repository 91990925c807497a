"""Body of the main job (kept apart so `doublesparse --help` imports nothing heavy)."""

from __future__ import annotations

import argparse


def run_main_job(args: argparse.Namespace) -> int:
    """Placeholder until the harness lands: say so plainly."""
    print("doublesparse run: the evaluation harness is being built; nothing was evaluated.")
    return 0
