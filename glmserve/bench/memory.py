"""Memory a model takes per weight format: resident memory after loading and the peak while loading, measured in a
fresh process (`--load-format dummy`: nothing read from disk), and the bytes each format stores, counted exactly
for any config on the meta device (no memory) to size the full GLM-4.5 and GLM-4.5-Air."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from glmserve.testing.checkpoint import TinyShape, config_dict

AIR = TinyShape(  # ../shared/reference/GLM45.md §5.1, GLM-4.5-Air (its MTP layer left out)
    hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96, num_key_value_heads=8,
    head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
    n_shared_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1, use_qk_norm=False, vocab_size=151552,
    max_position_embeddings=131072, num_nextn_predict_layers=0)
GLM45 = replace(AIR, hidden_size=5120, num_hidden_layers=92, first_k_dense_replace=3, intermediate_size=12288,
                moe_intermediate_size=1536, n_routed_experts=160, routed_scaling_factor=2.5, use_qk_norm=True)
EOS, PAD = [151329, 151336, 151338], 151329


def write_config(shape: TinyShape, directory: Path) -> Path:
    """A checkpoint directory with only config.json: enough for --load-format dummy."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict(shape, EOS, PAD, dtype="bfloat16"), indent=2))
    return directory


def stored_bytes(model) -> tuple[int, int]:
    """(logical parameters, bytes their weights and scales take) of a built model."""
    params = sum(_numel(getattr(p, "logical_shape", p.shape)) for p in model.parameters())
    scales = [b for name, b in model.named_buffers() if name.endswith("_scale")]
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *scales))
    return params, stored


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_on_meta(shape: TinyShape, quantization: str | None) -> dict:
    """Parameters and stored weight bytes of a model of this shape held in this format, without allocating it."""
    import torch

    from glmserve.config import ModelConfig
    from glmserve.layers.quantization import get_quant_method
    from glmserve.model import get_model_class

    config = ModelConfig.from_dict(config_dict(shape, EOS, PAD, dtype="bfloat16"))
    with torch.device("meta"):
        model = get_model_class(config)(config, None, get_quant_method(quantization))
    params, stored = stored_bytes(model)
    return {"params": params, "stored_bytes": stored, "stored_bytes_per_param": stored / params}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_here(model_dir: str, quantization: str | None) -> dict:
    """In this process (a fresh one): RSS before building the model (the interpreter, torch), after loading, and
    the peak in between (VmHWM, reset just before)."""
    import torch

    from glmserve.config import EngineConfig, ModelConfig
    from glmserve.engine.model_runner import ModelRunner

    torch.zeros(1)  # torch's own start-up allocations belong to the baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    runner = ModelRunner(ModelConfig.from_pretrained(model_dir),
                         EngineConfig(model=model_dir, load_format="dummy", quantization=quantization,
                                      num_kv_blocks=1, max_num_seqs=1), progress=False)
    after, peak = _status_kib("VmRSS") * 1024, _status_kib("VmHWM") * 1024
    params, stored = stored_bytes(runner.model)
    largest = max(_numel(getattr(p, "logical_shape", p.shape)[-2:]) for p in runner.model.parameters())
    return {"quantization": quantization or "none", "params": params, "stored_bytes": stored,
            "rss_before_bytes": before, "rss_after_bytes": after, "peak_rss_bytes": peak,
            "model_rss_bytes": after - before, "model_rss_per_param": (after - before) / params,
            "peak_over_loaded_bytes": peak - after, "largest_tensor_fp32_bytes": 4 * largest}


def measure(shape: TinyShape, quantization: str | None, threads: int = 2) -> dict:
    """measure_here in a fresh process, so that nothing loaded before counts."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(shape, Path(tmp))
        code = ("import json, sys, torch; from glmserve.bench.memory import measure_here; "
                f"torch.set_num_threads({threads}); "
                "print(json.dumps(measure_here(sys.argv[1], None if sys.argv[2] == 'none' else sys.argv[2])))")
        done = subprocess.run([sys.executable, "-c", code, str(model_dir), quantization or "none"],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {quantization} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
