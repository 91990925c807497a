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
        SparsityConfig(label_bits=3)


def test_model_checks():
    config = SparsityConfig(num_channels=32, dense_layers=[0, 5])
    with pytest.raises(ValueError, match="head_dim"):
        config.check_model(num_layers=8, head_dim=16)
    with pytest.raises(ValueError, match="dense_layers"):
        config.check_model(num_layers=4, head_dim=64)
    config.check_model(num_layers=8, head_dim=64)


def test_budget_semantics():
    assert SparsityConfig(token_budget=1 / 16).budget_for(160) == 10
    assert SparsityConfig(token_budget=1 / 16).budget_for(161) == 11
    assert SparsityConfig(token_budget=0.25).budget_for(3) == 1
    assert SparsityConfig(token_budget=64).budget_for(10) == 10
    assert SparsityConfig(token_budget=64, min_seq_len=512).budget_for(500) == 500
    assert SparsityConfig(token_budget=64, min_seq_len=512).budget_for(600) == 64


def test_round_trip_through_dict():
    config = SparsityConfig(num_channels=8, token_budget=0.125, label_bits=4, dense_layers=(0, 1), selection="head")
    assert SparsityConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        SparsityConfig.from_dict({"budget": 3})
