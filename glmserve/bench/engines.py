"""The engines the benchmarks time: glmserve's `LLM` and, for comparison, transformers' `generate` (in this
process), and any OpenAI-compatible server. All decode greedily with EOS ignored, from token-id prompts of equal
length; `generate(prompts, max_tokens)` returns the new token ids of each prompt."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch


class GlmserveEngine:
    def __init__(self, directory: Path, max_batch: int, prompt_len: int, max_new_tokens: int, dtype: str,
                 device: str, weight_dtype: str = "auto", quantization: str | None = None, **engine_args):
        from glmserve import LLM

        self.name = ("glmserve" + ("" if weight_dtype == "auto" else f"-{weight_dtype.replace('float', 'fp')}")
                     + ("" if quantization is None else f"-{quantization}"))
        block = 16
        blocks_per_seq = -(-(prompt_len + max_new_tokens) // block)
        # Prefix caching off: every repetition sends the same prompts, and a cache hit would skip the prefill.
        self.llm = LLM(model=str(directory), dtype=dtype, weight_dtype=weight_dtype, quantization=quantization,
                       device=device, block_size=block,
                       num_kv_blocks=max_batch * blocks_per_seq + 16, max_num_seqs=max_batch,
                       max_num_batched_tokens=max(2048, max_batch * prompt_len), enable_prefix_caching=False,
                       **engine_args)
        self.fp16_params = _fp16_stored_params(self.llm.engine.runner.model)
        self.fp16_experts = _experts_in_fp16(self.llm.engine.runner.model)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from glmserve import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outputs]


def _fp16_stored_params(model: torch.nn.Module) -> int:
    """Weights of the linear layers that --weight-dtype float16 keeps in half precision (for the roofline)."""
    from glmserve.layers.linear import LinearBase

    return sum(torch.ops.quantized.linear_unpack_fp16(m.fp16_weight)[0].numel()
               for m in model.modules() if isinstance(m, LinearBase) and getattr(m, "fp16_weight", None) is not None)


def _experts_in_fp16(model: torch.nn.Module) -> bool:
    """Whether --weight-dtype float16 keeps the routed experts in half precision (for the roofline)."""
    from glmserve.layers.moe import FusedExperts

    return any(isinstance(m, FusedExperts) and (getattr(m, "fp16_experts", None) is not None
                                                or m.w13.dtype == torch.float16) for m in model.modules())


class TransformersEngine:
    name = "transformers"

    def __init__(self, directory: Path, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(device).eval()
        # Ignore EOS the way glmserve's ignore_eos does: no EOS at all (min_new_tokens would mask EOS logits and
        # could change the greedy choice).
        self.pad = self.model.generation_config.pad_token_id
        self.model.generation_config.eos_token_id = None
        self.implementation = {"attn_implementation": self.model.config._attn_implementation,
                               "experts_implementation": getattr(self.model.config, "_experts_implementation", None)}

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # equal lengths: no padding needed
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_tokens, pad_token_id=self.pad)
        tokens = out[:, ids.shape[1]:].tolist()
        if any(len(t) != max_tokens for t in tokens):
            raise RuntimeError("transformers stopped early; EOS was not ignored")
        return tokens


class ServerEngine:
    """Any OpenAI-compatible server (glmserve, vLLM, ...), driven like the in-process engines: the batch's prompts
    go as concurrent /v1/completions requests (token-id prompts, greedy, EOS ignored), and the output token ids
    come back through vLLM's `return_token_ids`. `pids`: the server's processes, whose CPU is the measured work."""

    def __init__(self, name: str, base_url: str, model: str, pids: tuple[int, ...] = (), api_key: str | None = None):
        self.name, self.url, self.model, self.pids = name, f"{base_url}/v1/completions", model, pids
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return asyncio.run(self._generate(prompts, max_tokens))

    async def _generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        import httpx

        limits = httpx.Limits(max_connections=len(prompts))
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=self.headers) as client:
            responses = await asyncio.gather(*(client.post(self.url, json=self._body(p, max_tokens)) for p in prompts))
        tokens = []
        for response in responses:
            if response.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {response.text[:500]}")
            choice = response.json()["choices"][0]
            if choice.get("token_ids") is None:
                raise RuntimeError(f"{self.name} returned no token_ids (it does not support return_token_ids)")
            tokens.append(choice["token_ids"])
        return tokens

    def _body(self, prompt: list[int], max_tokens: int) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two greedy outputs differ (None if they are equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a),
                                                                                                         len(b)))


def profile_glmserve(engine: GlmserveEngine, prompts: list[list[int]], max_tokens: int, top: int = 25) -> str:
    """torch.profiler over the decode steps only (engine.step() after the prefill step) and cProfile of a whole
    `LLM.generate` (the Python side: scheduler, sampler, detokenization)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from glmserve import SamplingParams

    eng = engine.llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def decode_steps(prof=None) -> tuple[int, float]:
        for i, p in enumerate(prompts):
            eng.add_request(f"profile-{i}", p, params)
        while any(len(o.new_token_ids) == 0 for o in eng.step()):  # until the prefill step has sampled
            pass
        if prof is not None:
            prof.start()
        steps, t0 = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.stop()
        return steps, wall

    steps, wall = decode_steps()
    lines = [f"decode (engine.step() loop, no detokenization): {steps} steps, {wall / steps * 1e3:.2f} ms/step "
             f"= {len(prompts) * steps / wall:.1f} tok/s"]
    prof = profile(activities=[ProfilerActivity.CPU])
    steps, wall = decode_steps(prof)
    lines.append(f"torch.profiler over the decode steps ({wall / steps * 1e3:.2f} ms/step under the profiler):")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate(prompts, max_tokens)
    profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(top)
    lines += ["cProfile of one whole LLM.generate (prefill + decode), by own time:", buf.getvalue()]
    return "\n".join(lines)
