"""A decode step takes the fused native ops (kernels/): each decoder layer one residual-add + RMSNorm call per norm
and one QK-norm + RoPE call, the router one top-k call, the dense MLPs one SiLU * up call, greedy sampling one
argmax; and its greedy tokens are those of the torch fallback (GLMSERVE_KERNELS=torch's path)."""

from collections import Counter

import pytest

from glmserve import LLM, SamplingParams
from glmserve.kernels import native

FUSED = ("rms_norm", "rms_norm_residual", "qk_norm_rope_", "silu_and_mul", "router_topk", "argmax")


class CountingExtension:
    def __init__(self, ext, calls: Counter):
        self._ext, self._calls = ext, calls

    def __getattr__(self, name):
        fn = getattr(self._ext, name)

        def call(*args, **kwargs):
            self._calls[name] += 1
            return fn(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def glm45(checkpoints):
    return checkpoints("glm45")


def _greedy(llm: LLM, max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": [5, 17, 300, 42, 9]}], params)[0].outputs[0].token_ids


def test_decode_step_runs_the_fused_native_ops(glm45, monkeypatch):
    """The modules' path (the native decoder stack, which composes the same ops in C++, is off here)."""
    ext = native.extension()
    if ext is None:
        pytest.skip("no native extension here")
    monkeypatch.setenv("GLMSERVE_NATIVE_STACK", "0")
    llm = LLM(glm45, num_kv_blocks=16)
    config = llm.engine.runner.model_config
    _greedy(llm, 2)  # warm-up
    calls: Counter = Counter()
    monkeypatch.setattr(native, "extension", lambda: CountingExtension(ext, calls))
    steps = 4
    _greedy(llm, 1 + steps)  # the prefill step, then `steps` decode steps: every step samples
    layers, moe = config.num_hidden_layers, sum(map(config.is_moe_layer, range(config.num_hidden_layers)))
    per_step = {"rms_norm": 2,  # the first layer's input norm and the final norm
                "rms_norm_residual": 2 * layers - 1, "qk_norm_rope_": layers, "router_topk": moe,
                "silu_and_mul": layers,  # the dense MLPs and the shared experts
                "argmax": 1}
    assert {name: calls[name] for name in FUSED} == {name: n * (1 + steps) for name, n in per_step.items()}


def test_fused_greedy_tokens_equal_the_torch_fallback(glm45, monkeypatch):
    if native.extension() is None:
        pytest.skip("no native extension here")
    fused = _greedy(LLM(glm45, num_kv_blocks=16), 24)
    monkeypatch.setattr(native, "extension", lambda: None)
    assert _greedy(LLM(glm45, num_kv_blocks=16), 24) == fused
