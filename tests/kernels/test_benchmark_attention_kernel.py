"""benchmarks/attention_kernel.py as a smoke run at a short context: a figure for every storage dtype on both kinds
of pages, and the results JSON records the machine, its load and the THP setting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmserve.kernels import native

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_kernel.py"


def test_attention_kernel_benchmark_measures_every_case(tmp_path):
    if native.extension() is None:
        pytest.skip("no native extension here: the benchmark refuses to run")
    out = tmp_path / "attention.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--contexts", "300", "--threads", "1", "--repeats", "1",
                           "--output-json", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    cases = {(c["kv_dtype"], c["pages"]) for c in result["cases"]}
    assert cases == {(d, p) for d in ("float32", "bfloat16", "float8_e4m3fn") for p in ("small", "huge")}
    assert all(c["kernel_ms"] > 0 and c["kv_bytes_read"] == 2 * 300 * 2 * 64 * {"float32": 4, "bfloat16": 2}.get(
        c["kv_dtype"], 1) for c in result["cases"])
    assert not any(c["on_huge_pages"] for c in result["cases"])  # 300 tokens' pool is under one huge page
    assert result["thp"] is not None and "other_processes_cores" in result
