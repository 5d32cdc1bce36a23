"""`spar plan`: JSON rows, the readable table, --help with units, one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from spar.cli import main

ARGS = ["plan", "--params", "5.7e6", "--samples", "64", "--batch-size", "128", "--gpus", "16",
        "--gpus-per-node", "4", "--dataset-size", "50000", "--sample-cost-s", "1e-3",
        "--activation-bytes", "6e6"]  # fmt: skip


def test_json_rows_have_the_fields(capsys):
    assert main([*ARGS, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 5  # 16x1, 8x2, 4x4, 2x8, 1x16
    for r in rows:
        for key in ("mode", "sample_axis", "data_axis", "step_time_s", "epoch_time_s",
                    "efficiency", "memory_per_rank_bytes", "fits", "explanation"):  # fmt: skip
            assert key in r
        assert r["sample_axis"] * r["data_axis"] == 16
    assert {r["mode"] for r in rows} == {"sp", "hybrid", "ddp"}
    times = [r["step_time_s"] for r in rows]
    assert times == sorted(times)


def test_table_and_mode_filter(capsys):
    assert main([*ARGS, "--mode", "sp", "--mode", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "16x1" in out and "1x16" in out and "4x4" not in out
    assert "exposed all-reduce" in out


def test_help_lists_every_input_with_units(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, unit in [("--params", "count"), ("--samples", "count"),
                       ("--batch-size", "examples"), ("--sample-cost-s", "seconds"),
                       ("--weight-cost-s", "seconds"), ("--step-overhead-s", "seconds"),
                       ("--activation-bytes", "bytes"), ("--device-memory-gib", "GiB"),
                       ("--intra-node-gb-s", "GB/s"), ("--inter-node-gb-s", "GB/s"),
                       ("--latency-us", "microseconds"), ("--bucket-mb", "MiB"),
                       ("--dataset-size", "examples"), ("--gpus-per-node", "count"),
                       ("--comm-dtype", "float32")]:  # fmt: skip
        assert flag in text, flag
        assert unit in text, unit


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--sample-cost-s", "abc"], "--sample-cost-s"),
        (["--sample-cost-s", "-1"], "--sample-cost-s"),
        (["--samples", "63", "--batch-size", "129"], "no grid"),
        (["--comm-dtype", "int8"], "--comm-dtype"),
        (["--params", "1.5"], "--params"),
        (["--latency-us", "-3"], "--latency-us"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        main([*ARGS, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spar plan: error:"), err
    assert words in err


def test_missing_required_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--params", "1e6"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err and "Traceback" not in err
