"""benchmarks/kernel_speed.py as a smoke run on one small shape: every native format and every torch kernel gets a
figure (or the error a torch build without it gives), and the results JSON records the machine and its load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmserve.kernels import native

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"


def test_kernels_benchmark_measures_every_kernel(tmp_path):
    if native.extension() is None:
        pytest.skip("no native extension here: the benchmark refuses to run")
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "57m.expert_gate_up", "--batch-size", "1", "3",
                           "--threads", "1", "--clock", "cpu", "--repeats", "2", "--moe-shapes",
                           "--pool-mib", "4", "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = result["runs"][0]["rows"]
    assert {r["kernel"] for r in rows} >= {"glmserve int4-g32", "glmserve fp8", "torch fp32 F.linear",
                                           "torch fp32 oneDNN packed"}
    assert len(rows) == 2 * 14 and {r["batch"] for r in rows} == {1, 3}
    assert all(r["us"] > 0 and r["pct_of_roofline"] > 0 for r in rows if "error" not in r)
    assert result["clock"] == "cpu" and result["cpu"] and "other_processes_cores" in result
