"""benchmarks/kernel_floor.py on a small random checkpoint: it times the GEMM-only step and the real step of
every batch size, and the lm_head's weight-only kernels, and writes them as JSON."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_floor.py"


def test_kernel_floor_measures_every_batch_size(checkpoints, tmp_path):
    out = tmp_path / "floor.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(checkpoints("air")), "--threads", "1", "--batch-size",
                           "1", "3", "--repeats", "2", "--real-runs", "1", "--output-json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [s["batch"] for s in result["steps"]] == [1, 3]
    assert all(s["gemm_floor_ms"] > 0 and s["real_step_ms"] > 0 for s in result["steps"])
    assert [k["batch"] for k in result["lm_head_kernels"]] == [1, 3]
    assert all(v > 0 for k in result["lm_head_kernels"] for v in k.values())
    assert "GEMM floor" in done.stdout and "int8" in done.stdout
