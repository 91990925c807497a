"""The command-line front ends of `doublesparse eval`, `run`, `recall` and `bench`.

Each defines `HELP`, `add_arguments(parser)` and `run(args) -> int` (see `doublesparse/cli.py`) and
imports its heavy dependencies inside `run`, so that `doublesparse --help` stays fast.
"""
