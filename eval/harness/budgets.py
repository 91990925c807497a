"""The one parser of token-budget strings, for every command and benchmark, and its inverse for labels.

A budget here is a fraction of the context each decode step attends, in (0, 1]: "1/16", "0.0625" and
"1" are budgets; "64" is not (a count of tokens is not accepted from the command line).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional


def parse_budget(text: str, option: str = "--budget") -> Fraction:
    """'1/16' or '0.0625' -> Fraction(1, 16); ValueError naming `option` unless it is a number in (0, 1]."""
    try:
        budget = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{option}: {text!r} is not a number or a fraction like 1/16") from None
    if not 0 < budget <= 1:
        raise ValueError(f"{option}: {text!r} must lie in (0, 1]: it is the fraction of the context each step attends")
    return budget


def parse_budgets(text: str, option: str = "--budgets") -> list[Fraction]:
    """'1/4, 1/16' -> [Fraction(1, 4), Fraction(1, 16)]: comma-separated budgets, in order, each once."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: no budget given; pass a comma-separated list like 1/4,1/16")
    return list(dict.fromkeys(parse_budget(item, option) for item in items))


def sparsity_label(value: Optional[float]) -> str:
    """0.0625 -> '1/16'; None (dense) -> 'dense'."""
    if value is None:
        return "dense"
    fraction = Fraction(value).limit_denominator(1024)
    return f"{fraction.numerator}/{fraction.denominator}" if fraction.numerator != fraction.denominator else "1"
