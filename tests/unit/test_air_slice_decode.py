"""benchmarks/air_slice_decode.py on a tiny slice: the bytes a decode step reads are counted from the model (every
stored weight and scale but the embedding table and the routed experts, plus the experts the routers picked), and
a run writes tokens/s and its share of the roofline."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from glmserve.bench.memory import AIR, stored_bytes
from glmserve.kernels import native

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import air_slice_decode  # noqa: E402

TINY = replace(AIR, num_hidden_layers=3, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
               n_routed_experts=16, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048)


@pytest.fixture
def tiny_slice(monkeypatch):
    import torch

    monkeypatch.setattr(air_slice_decode, "fitting_slice", lambda *args: TINY)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the script sets its own


@pytest.mark.parametrize("modules", [False, True])
def test_step_bytes_count_the_model_and_the_routed_experts(tiny_slice, tmp_path, monkeypatch, modules):
    from glmserve.model import native_stack

    stacked = []
    call = native_stack.NativeStack.__call__
    monkeypatch.setattr(native_stack.NativeStack, "__call__", lambda *args: stacked.append(True) or call(*args))
    out = tmp_path / "air.json"
    assert air_slice_decode.main(["--quantization", "int8", "--batch-size", "1", "4", "--num-iters", "2",
                                  "--output-len", "5", "--threads", "1", "--output-json", str(out)]
                                 + ["--modules"] * modules) == 0
    # the timed runs' steps take the engine's default path, the native stack, unless --modules
    assert bool(stacked) == (not modules and native.extension() is not None)
    result = json.loads(out.read_text())
    assert result["quantization"] == "int8" and result["moe_layers"] == 2 and result["bandwidth"]["roofline_GBps"] > 0
    hidden, inter, experts = TINY.hidden_size, TINY.moe_intermediate_size, TINY.n_routed_experts
    # int8 per row: 1 byte a weight, one fp32 scale per row (w13: 2 * inter rows, w2: hidden rows).
    expert_bytes = 3 * inter * hidden + 4 * (2 * inter + hidden)
    embedding_row = hidden + 4
    for row in result["batches"]:
        assert row["expert_bytes"] == expert_bytes
        assert row["decode_tok_s"] > 0 and 0 < row["of_roofline"] < 1
        for run in row["runs"]:
            assert run["steps"] == 4 and run["tokens"] == 4 * row["batch"]
            picked = run["experts_per_moe_layer_step"]
            assert TINY.num_experts_per_tok <= picked <= min(experts, TINY.num_experts_per_tok * row["batch"])
            routed = run["bytes_read"] - run["steps"] * row["fixed_bytes_per_step"]
            assert routed == round(picked * run["steps"] * 2) * expert_bytes
    # fixed = everything stored but the routed experts and the embedding table, plus one embedding row per token
    counts = {row["batch"]: row["fixed_bytes_per_step"] for row in result["batches"]}
    assert counts[4] - counts[1] == 3 * embedding_row
    _, stored = stored_bytes(_tiny_model())
    assert counts[1] == stored - 2 * experts * expert_bytes - TINY.vocab_size * embedding_row + embedding_row


def _tiny_model():
    import torch

    from glmserve.bench.memory import EOS, PAD
    from glmserve.config import ModelConfig
    from glmserve.layers.quantization import get_quant_method
    from glmserve.model import get_model_class
    from glmserve.testing.checkpoint import config_dict

    config = ModelConfig.from_dict(config_dict(TINY, EOS, PAD, dtype="bfloat16"))
    with torch.device("meta"):
        return get_model_class(config)(config, None, get_quant_method("int8"))
