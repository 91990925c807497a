"""SparsityConfig validation and budget semantics."""

import pytest

from doublesparse import SparsityConfig


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"token_budget": 0}, "token_budget"),
        ({"token_budget": -3}, "token_budget"),
        ({"token_budget": 0.0}, "token_budget"),
        ({"token_budget": 1.5}, "token_budget"),
        ({"token_budget": "all"}, "token_budget"),
        ({"label_bits": 2}, "label_bits"),
        ({"label_bits": 4, "num_channels": 15}, "num_channels"),
        ({"num_channels": 0}, "num_channels"),
        ({"selection": "token"}, "selection"),
        ({"backend": "cuda"}, "backend"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"token_budget": 8, "sink_tokens": 4, "recent_tokens": 5}, "token_budget"),
        ({"dense_layers": (0, -1)}, "dense_layers"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        SparsityConfig(**changes)


def test_label_bits_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"\(16, 8, 4\)"):
        SparsityConfig(label_bits=3, sink_tokens=0, recent_tokens=0)


def test_model_checks():
    config = SparsityConfig(num_channels=32, dense_layers=[0, 5], label_bits=16, sink_tokens=0, recent_tokens=0)
    with pytest.raises(ValueError, match="head_dim"):
        config.check_model(num_layers=8, head_dim=16)
    with pytest.raises(ValueError, match="dense_layers"):
        config.check_model(num_layers=4, head_dim=64)
    config.check_model(num_layers=8, head_dim=64)


def test_budget_semantics():
    assert SparsityConfig(token_budget=1 / 16, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(160) == 10
    assert SparsityConfig(token_budget=1 / 16, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(161) == 11
    assert SparsityConfig(token_budget=0.25, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(3) == 1
    assert SparsityConfig(token_budget=64, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(10) == 10
    assert (
        SparsityConfig(token_budget=64, min_seq_len=512, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(500)
        == 500
    )
    assert (
        SparsityConfig(token_budget=64, min_seq_len=512, label_bits=16, sink_tokens=0, recent_tokens=0).budget_for(600)
        == 64
    )


def test_round_trip_through_dict():
    config = SparsityConfig(
        num_channels=8,
        token_budget=0.125,
        label_bits=4,
        dense_layers=(0, 1),
        selection="head",
        sink_tokens=0,
        recent_tokens=0,
    )
    assert SparsityConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        SparsityConfig.from_dict({"budget": 3})


def test_the_readme_states_the_defaults_sparsityconfig_has():
    import re
    from fractions import Fraction
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| ([^|]+) \|", readme, flags=re.M)
    stated = {}
    for names, defaults in rows:
        for name, value in zip(re.findall(r"`(\w+)`", names), re.findall(r"`([^`]+)`", defaults)):
            stated[name] = value
    config = SparsityConfig()
    assert set(stated) >= {"num_channels", "token_budget", "label_bits", "sink_tokens", "recent_tokens", "selection"}
    for name, value in stated.items():
        actual = getattr(config, name)
        if name == "token_budget":
            assert Fraction(actual).limit_denominator(1024) == Fraction(value), name
        else:
            assert repr(actual).replace("'", '"') == value, name
