"""Tensor parallelism on CPU: two gloo ranks under torchrun decode exactly as the single-process patched model.

One torchrun launch (tests/tensor_parallel_worker.py) runs every case, since starting two Python processes
with torch and transformers is most of the cost. The model: a tiny Llama with 4 query / 2 KV heads, so each
rank holds 2 query heads and 1 KV head.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model

pytestmark = pytest.mark.slow  # two fresh processes importing torch and transformers: ~20 s on 2 cores

WORKER = Path(__file__).parent / "tensor_parallel_worker.py"
LOGIT_TOLERANCE = 1e-4  # the ranks' o_proj partial sums are all-reduced: equal up to float rounding


@pytest.fixture(scope="module")
def tp_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2).save_pretrained(folder / "model")
    # One KV head cannot be split over two ranks: doublesparse must refuse it.
    tiny_model("llama", num_heads=2, num_kv_heads=1, head_dim=16, num_layers=2).save_pretrained(folder / "split")
    tiny_model("phi3", num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2).save_pretrained(folder / "fused")
    out = folder / "out"
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",  # a free port of its own: several test runs may share the machine
        str(WORKER),
        str(folder / "model"),
        str(folder / "split"),
        str(folder / "fused"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Its own process group, so that a timeout kills the ranks too, not only torchrun (orphaned ranks
    # would keep the machine busy after the test).
    launch = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = launch.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        stdout, stderr = launch.communicate()
        pytest.fail("the 2-rank torchrun launch did not finish in 240 s:\n" + stdout[-3000:] + stderr[-6000:])
    assert launch.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_each_rank_holds_its_own_heads(tp_report):
    assert [r["heads"] for r in tp_report] == [[0, 2, 0, 1], [2, 4, 1, 2]]
    assert all(r["heads_match_weights"] for r in tp_report)


@pytest.mark.parametrize(
    "case",
    [
        "group_int4_budget6",
        "head_int4_budget6",
        "group_fp16_quarter",
        "head_int4_static",
        "group_int4_static",
        "group_int4_offload",
    ],
)
def test_decoding_equals_single_process(tp_report, case):
    for rank in tp_report:
        result = rank["cases"][case]
        assert "error" not in result, f"rank {rank['rank']}: {result.get('error')}"
        assert result["plan_channels_equal"], f"rank {rank['rank']}: channel rows are not its heads' rows"
        assert result["tokens_equal"], f"rank {rank['rank']}: tokens differ from the single-process model"
        assert result["max_logit_diff"] < LOGIT_TOLERANCE, result
        heads, kv_heads, select = result["plan_heads"]
        assert (heads, kv_heads) == (2, 1)
        assert select == (1 if case.startswith("group") else 2)


def test_calibration_gathers_the_single_process_mask(tp_report):
    for rank in tp_report:
        calibration = rank["calibration"]
        assert calibration["ranking_equal"]
        assert calibration["max_statistic_rel_diff"] < 1e-4
        assert calibration["tokens"][0] == calibration["tokens"][1] == 4 * 24


def test_a_mask_that_does_not_fit_names_the_rank(tp_report):
    for rank in tp_report:
        message = rank["local_mask_error"]
        assert f"rank {rank['rank']} of 2" in message
        assert "2 of 4" in message and "1 of 2" in message  # query and KV heads, held of all
        assert "2 rows of query heads per layer but the model has 4" in message


def test_kv_heads_that_do_not_split_are_refused(tp_report):
    for rank in tp_report:
        message = rank["split_head_error"]
        assert f"rank {rank['rank']} of 2" in message and "not whole" in message, message
        assert rank["split_head_untouched"]


def test_a_gathered_fused_projection_keeps_every_head_on_every_rank(tp_report):
    for rank in tp_report:
        result = rank["fused_gathered"]
        assert "error" not in result, result.get("error")
        assert result["tokens_equal"] and result["max_logit_diff"] < LOGIT_TOLERANCE
        assert result["plan_heads"] == [4, 2, 2] and result["plan_channels_equal"]
        assert "fused qkv" in rank["fused_prefetch_error"] and "prefetch=False" in rank["fused_prefetch_error"]
