"""`spar plan`: JSON rows, the readable table, --help with units, one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from spar.cli import _count, main

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


SMALL = ["plan", "--params", "1e6", "--samples", "8", "--batch-size", "64", "--gpus", "4",
         "--sample-cost-s", "0.01"]  # fmt: skip


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--bucket-mb", "1e-6"], "--bucket-mb must be >= 1 KiB"),  # was one loop per bucket
        (["--first-bucket-mb", "1e-6"], "--first-bucket-mb"),
        (["--params", "1e300"], "--params"),
        (["--params", "1e20", "--bucket-mb", "1e-3"], "--params"),
        (["--gpus", "1000000000"], "no grid"),  # was a loop over 1e9 divisors
        (["--gpus", "1e12"], "--gpus"),
        (["--sample-cost-s", "1e308"], "--sample-cost-s"),  # printed "inf ms", "nan"
        (["--activation-bytes", "1e300"], "--activation-bytes"),  # 300-digit GiB
        (["--inter-node-gb-s", "1e-300"], "--inter-node-gb-s"),
        (["--dataset-size", "10"], "--dataset-size must be >= --batch-size"),
        (["--samples", "1.5"], "--samples"),
    ],
)
def test_hangs_and_overflows_are_one_line_errors(capsys, extra, words):
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main([*SMALL, *extra])
    assert time.perf_counter() - t < 2.0
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spar plan: error:"), err
    assert words in err and "Traceback" not in err


def test_no_grid_error_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--samples", "63", "--batch-size", "129"])
    err = capsys.readouterr().err
    assert "--samples=63" in err and "--batch-size=129" in err and "--gpus" in err
    assert "num_samples" not in err and "batch_size" not in err


def test_counts_parse_exactly_and_consistently(capsys):
    assert _count("12345678901234567") == 12345678901234567  # not ...568 via float
    assert _count("5.7e6") == 5_700_000
    assert _count("1.000000000000000001e18") == 10**18 + 1
    for bad in ("1.5", "0", "-3", "abc", "inf", "nan", "1e-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            _count(bad)
    # every count takes the same forms as --params
    argv = ["plan", "--params", "1e6", "--samples", "1e3", "--batch-size", "6.4e1",
            "--gpus", "4e0", "--gpus-per-node", "4", "--cost-batch", "6.4e1",
            "--dataset-size", "6.4e3", "--sample-cost-s", "1e-3", "--json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["samples_per_rank"] * r["sample_axis"] for r in rows} == {1000}
    assert {r["steps_per_epoch"] for r in rows} == {100}
    argv = [*SMALL[:5], "--batch-size", "1", *SMALL[7:], "--dataset-size", "12345678901234567"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["steps_per_epoch"] for r in rows} == {12345678901234567}  # not ...568


def test_tie_note_and_what_separates(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "tie" in note[0] and "--weight-cost-s" in note[0]
    assert "not modelled" in note[0]
    assert main([*SMALL, "--weight-cost-s", "1e-4"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_bandwidth_help_says_which_bandwidth(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("busbw") >= 2 and "nccl-tests" in text and "2(n-1)/n" in text
