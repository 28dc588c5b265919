"""benchmarks/kv_cache_heldout.py's arithmetic: the paired difference of two dtypes' outcomes on the same requests
and its standard error, each rate per dtype, and the identical-reply fractions; then a run through the server on a
few requests of one kind."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import kv_cache_heldout  # noqa: E402


def test_paired_difference_counts_only_the_requests_that_changed():
    base = [True] * 50 + [False] * 50
    other = [True] * 49 + [False] + [True] + [False] * 49  # one lost, one gained: the same rate
    diff, stderr = kv_cache_heldout.paired_difference(base, other)
    assert diff == 0.0
    assert stderr == pytest.approx(math.sqrt(2 / 99 / 100))  # two changed of 100, far below the unpaired 0.07
    diff, _ = kv_cache_heldout.paired_difference(base, [False] * 100)
    assert diff == -0.5


def test_compare_gives_each_rate_and_the_identical_replies():
    outcomes = {"auto": {"arithmetic_direct/correct": [True, True, False, False],
                         "arithmetic_direct/direct": [True] * 4},
                "fp8": {"arithmetic_direct/correct": [True, False, False, False],
                        "arithmetic_direct/direct": [True] * 4}}
    replies = {"auto": {"arithmetic_direct": [(None, "5", []), (None, "7", []), (None, "9", []), (None, "1", [])]},
               "fp8": {"arithmetic_direct": [(None, "5", []), (None, "8", []), (None, "9", []), (None, "1", [])]}}
    result = kv_cache_heldout.compare(outcomes, replies, ["auto", "fp8"])
    row = result["rates"]["nonthinking_arithmetic_accuracy"]
    assert (row["n"], row["auto"], row["fp8"], row["fp8_minus_auto"]) == (4, 0.5, 0.25, -0.25)
    assert result["rates"]["nonthinking_direct_answer"]["fp8_minus_auto_stderr"] == 0.0
    assert "tool_name_accuracy" not in result["rates"]  # kinds not measured are left out
    assert result["identical_replies"] == {"fp8": {"arithmetic_direct": 0.75}}


def test_a_run_pairs_the_same_requests_through_the_server(tmp_path):
    out = tmp_path / "heldout.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "kv_cache_heldout.py"), "--seeds", "1000",
                           "--per-kind", "4", "--kinds", "arithmetic_direct", "--kv-cache-dtypes", "auto", "auto",
                           "--threads", "1", "--concurrency", "1", "--output-json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    row = result["rates"]["nonthinking_arithmetic_accuracy"]
    assert row["n"] == 4 and row["auto"] == row["auto#2"] and row["auto#2_minus_auto"] == 0.0
    assert result["identical_replies"] == {"auto#2": {"arithmetic_direct": 1.0}}  # one at a time, greedy: the same
