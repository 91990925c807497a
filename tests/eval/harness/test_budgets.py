"""The one budget parser: fractions and decimals in (0, 1], errors that name the option."""

from fractions import Fraction

import pytest

from doublesparse.eval.harness.budgets import parse_budget, parse_budgets, sparsity_label


@pytest.mark.parametrize(
    "text, expected", [("1/16", Fraction(1, 16)), (" 0.0625 ", Fraction(1, 16)), ("1", Fraction(1))]
)
def test_budgets_parse_to_fractions(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("64", "must lie in"),
        ("0", "must lie in"),
        ("-1/4", "must lie in"),
        ("1/0", "not a number"),
        ("a quarter", "not a number"),
        ("", "not a number"),
    ],
)
def test_bad_budgets_name_the_option(text, message):
    with pytest.raises(ValueError, match=f"--sparsity: .*{message}"):
        parse_budget(text, "--sparsity")


def test_budget_lists_keep_order_and_drop_repeats():
    assert parse_budgets("1/4, 1/16,,0.25") == [Fraction(1, 4), Fraction(1, 16)]
    with pytest.raises(ValueError, match="--budgets: no budget given"):
        parse_budgets(" , ")


def test_labels_invert_the_parser():
    assert [sparsity_label(float(parse_budget(t))) for t in ("1/4", "0.0625", "1")] == ["1/4", "1/16", "1"]
    assert sparsity_label(None) == "dense"
