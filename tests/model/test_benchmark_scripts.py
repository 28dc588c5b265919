"""Benchmark scripts on small shapes, as smoke runs: kernel_floor.py times the GEMM-only and the real decode step
of every batch size and the lm_head's weight-only kernels; gpu_air_slice.py (meant for a GPU session) times an
Air-shaped slice with dummy weights against its roofline. Both write their results as JSON."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_kernel_floor_measures_every_batch_size(checkpoints, tmp_path):
    out = tmp_path / "floor.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_floor.py"), str(checkpoints("air")),
                           "--threads", "1", "--batch-size", "1", "3", "--repeats", "2", "--real-runs", "1",
                           "--output-json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [s["batch"] for s in result["steps"]] == [1, 3]
    assert all(s["gemm_floor_ms"] > 0 and s["real_step_ms"] > 0 for s in result["steps"])
    assert [k["batch"] for k in result["lm_head_kernels"]] == [1, 3]
    assert all(v > 0 for k in result["lm_head_kernels"] for v in k.values())
    assert "GEMM floor" in done.stdout and "int8" in done.stdout


def test_air_slice_runs_on_cpu_with_shrunk_dimensions(tmp_path):
    out = tmp_path / "slice.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_air_slice.py"), "--device", "cpu", "--dtype",
                           "float32", "--layers", "2", "--hidden-size", "128", "--n-routed-experts", "8",
                           "--moe-intermediate-size", "32", "--intermediate-size", "256", "--vocab-size", "2048",
                           "--batch-size", "1", "2", "--input-len", "16", "--output-len", "4", "--num-iters", "1",
                           "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["shape"]["num_attention_heads"] == 96 and result["shape"]["head_dim"] == 128
    assert [r["batch"] for r in result["results"]] == [1, 2]
    assert all(r["decode_step_ms"] > 0 and 0 < r["of_roofline"] for r in result["results"])
    assert result["params"]["n_routed_experts"] == 8 and result["params"]["routed_experts"] > 0
