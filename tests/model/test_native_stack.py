"""The native decoder stack (model/native_stack.py, kernels/csrc/decoder_stack.cpp) computes what the modules compute,
bit for bit, on every step it takes, and takes exactly the steps it should: each step's hidden states with the stack
equal those of the same engine with GLMSERVE_NATIVE_STACK=0, over prefills, decodes of several sequences, prefix-cache
hits, MTP verification and drafting (the MTP layer's own stack), every weight format and KV cache dtype."""

import math

import pytest
import torch

from glmserve import LLM, SamplingParams
from glmserve.kernels import native
from glmserve.layers.quantization import prefill_gemm
from glmserve.layers.quantization.unquantized import native_linear_max_rows
from glmserve.model import native_stack

pytestmark = pytest.mark.skipif(native.extension() is None, reason="no native extension here")

SHARED = list(range(40, 76))  # 36 tokens: two prompts share more than one whole block
PROMPTS = [SHARED + [5, 17, 300, 42, 9], SHARED + [8, 1]]


class StepRecorder:
    """Each step's hidden states out of Glm4MoeModel.forward, its rows, and whether the stack ran it."""

    def __init__(self, llm: LLM, monkeypatch):
        self.outputs, self.rows, self.stacked = [], [], []
        model = llm.engine.runner.model.model
        forward, call = model.forward, native_stack.NativeStack.__call__
        self.model = model
        ran = []

        def counting_call(stack, *args):
            ran.append(True)
            return call(stack, *args)

        def recording_forward(inputs, positions, meta):
            ran.clear()
            out = forward(inputs, positions, meta)
            self.outputs.append(out.clone())
            self.rows.append(inputs.shape[0])
            self.stacked.append(bool(ran))
            return out

        monkeypatch.setattr(native_stack.NativeStack, "__call__", counting_call)
        model.forward = recording_forward
        # the MTP layer's outputs too (its drafts), when the engine speculates
        self.mtp_outputs, self.mtp_rows, self.mtp_stacked = [], [], []
        self.mtp = llm.engine.runner.model.mtp_layer if llm.engine.runner.proposer is not None else None
        if self.mtp is not None:
            mtp_forward = self.mtp.forward

            def recording_mtp(*args):
                ran.clear()
                out = mtp_forward(*args)
                self.mtp_outputs.append(out.clone())
                self.mtp_rows.append(args[0].shape[0])  # positions
                self.mtp_stacked.append(bool(ran))
                return out

            self.mtp.forward = recording_mtp


def _run(checkpoint, monkeypatch, stack: bool, prompts=PROMPTS, max_tokens: int = 5, **engine) -> StepRecorder:
    monkeypatch.setenv("GLMSERVE_NATIVE_STACK", "1" if stack else "0")
    llm = LLM(checkpoint, num_kv_blocks=64, **engine)
    recorder = StepRecorder(llm, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(2):  # the second time round, the prompts' blocks are prefix-cache hits
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return recorder


def _assert_same_steps(checkpoint, monkeypatch, **engine) -> StepRecorder:
    """Runs the prompts with and without the stack; every step equal, and the stack ran the steps it takes."""
    with_stack = _run(checkpoint, monkeypatch, True, **engine)
    modules = _run(checkpoint, monkeypatch, False, **engine)
    assert not any(modules.stacked)
    assert with_stack.rows == modules.rows
    for step, (a, b) in enumerate(zip(with_stack.outputs, modules.outputs)):
        assert torch.equal(a, b), f"step {step} ({with_stack.rows[step]} rows) differs: {(a - b).abs().max()}"
    assert len(with_stack.mtp_outputs) == len(modules.mtp_outputs)
    for step, (a, b) in enumerate(zip(with_stack.mtp_outputs, modules.mtp_outputs)):
        assert torch.equal(a, b), f"MTP call {step} differs: {(a - b).abs().max()}"
    stack = with_stack.model.native_stack.stack
    assert stack is not None
    # exactly the steps of at most max_rows rows ran in the stack (but the first when its KV scales come from it)
    expected = [rows <= stack.max_rows for rows in with_stack.rows]
    expected[0] &= not engine.get("calculate_kv_scales", False)
    assert with_stack.stacked == expected
    assert any(with_stack.stacked)
    return with_stack


@pytest.mark.parametrize("shape, quantization, kv_cache_dtype", [
    ("glm45", None, "auto"),
    ("air", None, "fp8"),
    ("glm45", "int8", "auto"),
    ("air", "q8_0", "fp8_e5m2"),
    ("glm45", "int4", "bfloat16"),
    ("air", "q4_0", "auto"),
    ("grouped", "fp8", "fp8"),
])
def test_the_stack_equals_the_modules_step_for_step(checkpoints, monkeypatch, shape, quantization, kv_cache_dtype):
    recorder = _assert_same_steps(checkpoints(shape), monkeypatch, quantization=quantization,
                                  kv_cache_dtype=kv_cache_dtype)
    if quantization is None:  # fp32 weights: past the native kernel's row limit on this ISA, oneDNN's packed GEMM
        assert recorder.model.native_stack.stack.max_rows == native_linear_max_rows()
    else:  # (fp8 prefills here may exceed its GEMM threshold, where that GEMM is fast)
        assert recorder.model.native_stack.stack.max_rows > max(recorder.rows[1:])


def test_the_stack_equals_the_modules_with_mtp_verification(checkpoints, monkeypatch):
    recorder = _assert_same_steps(checkpoints("glm45"), monkeypatch, quantization="int8", num_speculative_tokens=2)
    assert any(rows > len(PROMPTS) for rows, stacked in zip(recorder.rows, recorder.stacked) if stacked)
    # the MTP layer ran in a stack of its own, at the rows it takes (on an AMX CPU a prompt's rows take int8's GEMM)
    max_rows = recorder.mtp.native_stack.stack.max_rows
    assert recorder.mtp_stacked == [rows <= max_rows for rows in recorder.mtp_rows] and any(recorder.mtp_stacked)


def test_the_stack_takes_kv_scales_from_the_first_keys(checkpoints, monkeypatch):
    """--calculate-kv-scales: the first step sets the scales on the modules; the stack is made after it."""
    recorder = _assert_same_steps(checkpoints("air"), monkeypatch, quantization="int8", kv_cache_dtype="fp8",
                                  calculate_kv_scales=True)
    assert not recorder.stacked[0] and recorder.stacked[1]
    assert all(recorder.model.layers[i].self_attn.kv_cache.k_scale != 1.0 for i in recorder.model.held)


def test_the_stack_stops_where_the_gemm_path_starts(checkpoints, monkeypatch):
    """A layout that torch's GEMM serves on this CPU keeps the stack below GEMM_MIN_ROWS rows."""
    recorder = _run(checkpoints("air"), monkeypatch, True, max_tokens=1, quantization="fp8")
    wants = "fp8" in prefill_gemm.fast_layouts()
    assert recorder.model.native_stack.stack.max_rows == (prefill_gemm.GEMM_MIN_ROWS["fp8"] - 1 if wants else math.inf)
    monkeypatch.setenv("GLMSERVE_PREFILL_GEMM", "0")
    recorder = _run(checkpoints("air"), monkeypatch, True, max_tokens=1, quantization="fp8")
    assert recorder.model.native_stack.stack.max_rows == math.inf


@pytest.mark.parametrize("plant", ["rotary_dim", "attention_scale", "routed_scaling_factor", "input_norm_eps"])
def test_a_planted_fault_in_the_stack_is_caught(checkpoints, monkeypatch, plant):
    """The comparison above catches a stack that differs in one detail from the modules."""
    layer_of = native_stack._layer

    def planted(decoder_layer, extension):
        built = layer_of(decoder_layer, extension)
        layer = built[0]
        if plant == "rotary_dim":
            layer.rotary_dim -= 2
        elif plant == "attention_scale":
            layer.attention_scale *= 1.0001
        elif plant == "routed_scaling_factor" and layer.moe:
            layer.routed_scaling_factor *= 1.5
        elif plant == "input_norm_eps":
            layer.input_norm_eps *= 10
        return built

    monkeypatch.setattr(native_stack, "_layer", planted)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_steps(checkpoints("glm45"), monkeypatch, quantization="int8", kv_cache_dtype="fp8")


def test_layers_with_lora_adapters_stay_on_the_modules(checkpoints, monkeypatch):
    recorder = _run(checkpoints("air"), monkeypatch, True, max_tokens=2, quantization="int8")
    layers = [recorder.model.layers[i] for i in recorder.model.held]
    assert native_stack.build(layers, recorder.model.native_stack.parallel) is not None
    monkeypatch.setattr(layers[-1].self_attn.o_proj, "lora", object())
    assert native_stack.build(layers, recorder.model.native_stack.parallel) is None


def test_steps_run_on_the_modules_while_a_hook_is_registered(checkpoints, monkeypatch):
    """A hook registered after the stack was made is called at every step; once removed, the stack runs again."""
    monkeypatch.setenv("GLMSERVE_NATIVE_STACK", "1")
    llm = LLM(checkpoints("air"), num_kv_blocks=64, quantization="int8")
    recorder = StepRecorder(llm, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    llm.generate(prompts, params)
    assert recorder.model.native_stack.stack is not None and recorder.stacked[1:] == [True, True]
    calls = []
    hook = recorder.model.layers[recorder.model.held[-1]].mlp.gate.register_forward_hook(
        lambda *args: calls.append(True))
    recorder.stacked.clear()
    llm.generate(prompts, params)
    assert not any(recorder.stacked) and len(calls) == 3
    hook.remove()
    recorder.stacked.clear()
    llm.generate(prompts, params)
    assert recorder.stacked[1:] == [True, True]
