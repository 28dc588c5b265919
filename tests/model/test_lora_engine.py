"""LoRA through the engine: a batch mixing three adapters and the base model (chunked prefill, a prefix-cache hit)
gives every request the tokens it gets alone; --max-loras holds per step; runtime load and unload; bad adapters."""

import json

import pytest
import torch

from glmserve.config import ConfigError, EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.testing.checkpoint import SHAPES
from glmserve.testing.lora import write_random_adapter
from glmserve.types import AdapterError, LoRAInUseError, LoRANotFoundError, LoRARequest, ParamError, SamplingParams

SHAPE = "glm45"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters of different ranks and targets (one on the routed experts, fused layout)."""
    root = tmp_path_factory.mktemp("adapters")
    specs = [(8, ("attn",), "per_expert"), (4, ("attn", "mlp"), "per_expert"), (16, ("mlp", "experts"), "fused")]
    for i, (rank, targets, layout) in enumerate(specs):
        write_random_adapter(root / f"a{i}", SHAPES[SHAPE], rank, targets, layout, seed=10 + i, magnitude=2.0)
    return [("a0", str(root / "a0")), ("a1", str(root / "a1")), ("a2", str(root / "a2"))]


def _engine(directory, adapters, **flags) -> LLMEngine:
    config = dict(model=str(directory), num_kv_blocks=64, block_size=4, enable_lora=True, max_loras=3,
                  lora_modules=tuple(adapters)) | flags
    return LLMEngine(EngineConfig(**config), progress=False)


def _params(engine: LLMEngine, name: str | None) -> SamplingParams:
    lora = None if name is None else engine.loras.adapters[name]
    return SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, lora_request=lora)


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], str | None]], on_step=None) -> dict:
    for rid, (prompt, name) in requests.items():
        engine.add_request(rid, prompt, _params(engine, name))
    out = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        if on_step is not None:
            on_step()
    return out


def _prompts():
    gen = torch.Generator().manual_seed(7)
    vocab = SHAPES[SHAPE].vocab_size
    prefix = torch.randint(0, vocab, (12,), generator=gen).tolist()
    tails = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 3, 14, 6, 5)]
    return prefix, tails


def test_mixed_batch_matches_each_request_alone(checkpoints, adapters):
    directory = checkpoints(SHAPE)
    prefix, tails = _prompts()
    # Alone: one request at a time, no prefix cache, no chunking.
    alone_engine = _engine(directory, adapters, enable_prefix_caching=False)
    batch = {"r0": (prefix + tails[0], "a0"), "r1": (prefix + tails[1], "a1"), "r2": (tails[2], "a2"),
             "r3": (prefix + tails[3], None), "r4": (prefix + tails[4], "a1")}
    alone = {rid: _run(alone_engine, {rid: req})[rid] for rid, req in batch.items()}
    assert len({tuple(t) for t in alone.values()}) >= 4  # the adapters make a difference

    engine = _engine(directory, adapters, long_prefill_token_threshold=5)  # prompts prefill in chunks of 5
    warm = _run(engine, {"warm": (prefix + [1, 2, 3], "a1")})  # leaves a1's blocks of the prefix cached
    assert len(warm["warm"]) == 6
    requests = {}
    for rid, req in batch.items():
        engine.add_request(rid, req[0], _params(engine, req[1]))
        requests[rid] = engine.scheduler.get_request(rid)
    out = {rid: [] for rid in batch}
    sizes = []
    while engine.has_unfinished_requests():
        sizes.append(len(engine.scheduler.running))
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    assert max(sizes) == len(batch)  # all five ran in the same steps
    assert out == alone
    # a1's requests hit the cached prefix blocks (12 tokens = 3 blocks); base and a0 never share a1's blocks
    assert requests["r1"].num_cached_tokens == requests["r4"].num_cached_tokens == 12
    assert requests["r0"].num_cached_tokens == requests["r3"].num_cached_tokens == 0


def test_max_loras_limits_each_step(checkpoints, adapters):
    """With --max-loras 2, no step holds three adapters; the outputs are those of the unlimited engine."""
    directory = checkpoints(SHAPE)
    prefix, tails = _prompts()
    batch = {f"r{i}": (tails[i], f"a{i % 3}") for i in range(5)}
    expected = _run(_engine(directory, adapters), batch)
    engine = _engine(directory, adapters, max_loras=2)
    seen = []
    schedule = engine.scheduler.schedule

    def spy():
        output = schedule()
        seen.append({c.request.sampling_params.lora_request.lora_name for c in output.chunks})
        return output

    engine.scheduler.schedule = spy
    assert _run(engine, batch) == expected
    assert max(len(s) for s in seen) == 2


def test_runtime_load_and_unload(checkpoints, adapters):
    directory = checkpoints(SHAPE)
    prefix, tails = _prompts()
    engine = _engine(directory, adapters[:1], max_loras=2)
    reference = _run(_engine(directory, adapters), {"x": (tails[0], "a1")})["x"]
    engine.add_request("long", tails[1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                        lora_request=engine.loras.adapters["a0"]))
    engine.step()
    engine.add_lora("a1", adapters[1][1])  # loaded while a request runs; it serves the next one
    engine.add_request("x", tails[0], _params(engine, "a1"))
    with pytest.raises(LoRAInUseError, match="in use by 1"):
        engine.remove_lora("a1")
    out = {"x": [], "long": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    assert out["x"] == reference
    engine.remove_lora("a1")  # no request uses it any more
    with pytest.raises(ParamError, match="not loaded"):
        engine.add_request("y", tails[0], SamplingParams(lora_request=LoRARequest("a1", 2, adapters[1][1])))
    with pytest.raises(LoRANotFoundError):
        engine.remove_lora("a1")
    engine.add_lora("a1", adapters[1][1])  # a new load: a new id, the same tokens
    assert _run(engine, {"z": (tails[0], "a1")})["z"] == reference


def _bad(tmp_path, name, config_update=None, tensors=None):
    d = tmp_path / name
    write_random_adapter(d, SHAPES[SHAPE], 4, ("attn",), seed=1)
    if config_update is not None:
        config = json.loads((d / "adapter_config.json").read_text()) | config_update
        (d / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        from safetensors.torch import save_file
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_bad_adapters_are_refused_clearly(checkpoints, adapters, tmp_path):
    directory = checkpoints(SHAPE)
    engine = _engine(directory, [], max_lora_rank=8)
    a = torch.zeros(4, 64)
    b = torch.zeros(64, 4)
    cases = [
        (tmp_path / "missing", "does not exist"),
        (_bad(tmp_path, "dora", {"use_dora": True}), "DoRA"),
        (_bad(tmp_path, "mts", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (_bad(tmp_path, "rank", {"r": 16}, {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight":
                                            torch.zeros(16, 128),
                                            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight":
                                            torch.zeros(64, 16)}), "above --max-lora-rank 8"),
        (_bad(tmp_path, "mtp", None, {"base_model.model.model.layers.5.self_attn.o_proj.lora_A.weight": a,
                                      "base_model.model.model.layers.5.self_attn.o_proj.lora_B.weight": b}),
         "no such module"),
        (_bad(tmp_path, "dense", None, {"base_model.model.model.layers.4.mlp.gate_proj.lora_A.weight": a,
                                        "base_model.model.model.layers.4.mlp.gate_proj.lora_B.weight": b}),
         "no such module"),
        (_bad(tmp_path, "head", None, {"base_model.model.lm_head.lora_A.weight": a,
                                       "base_model.model.lm_head.lora_B.weight": b}), "no such module"),
    ]
    for path, message in cases:
        with pytest.raises(AdapterError, match=message):
            engine.add_lora(path.name, str(path))
    garbled = _bad(tmp_path, "garbled")
    (garbled / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        engine.add_lora("garbled", str(garbled))
    pickled = _bad(tmp_path, "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin"):
        engine.add_lora("pickled", str(pickled))
    assert engine.loras.adapters == {}
    with pytest.raises(ConfigError, match="--lora-modules bad="):
        _engine(directory, [("bad", str(tmp_path / "missing"))])
    with pytest.raises(ConfigError, match="tensor-parallel"):
        EngineConfig(model=str(directory), enable_lora=True, tensor_parallel_size=2)


def test_offline_llm_and_mtp_drafts_with_adapters(checkpoints, adapters):
    """LLM.generate(..., lora_request=...) as in vLLM. With MTP drafts on, the base model's MTP layer drafts for
    adapter requests too and verification keeps the adapter's greedy tokens unchanged."""
    from glmserve import LLM

    directory = checkpoints(SHAPE)
    _, tails = _prompts()
    expected = _run(_engine(directory, adapters), {"x": (tails[0], "a1"), "y": (tails[1], None),
                                                   "z": (tails[2], "a2")})
    llm = LLM(directory, enable_lora=True, max_loras=2, num_kv_blocks=64, block_size=4, num_speculative_tokens=2)
    loras = [LoRARequest("a1", 7, adapters[1][1]), None, LoRARequest("a2", 8, adapters[2][1])]
    outs = llm.generate([{"prompt_token_ids": t} for t in tails[:3]], GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [expected["x"], expected["y"], expected["z"]]
    assert llm.engine.scheduler.spec_decoding.num_drafts > 0


def test_adapters_beyond_max_cpu_loras_are_read_again(checkpoints, adapters):
    """--max-loras 1 --max-cpu-loras 1 with three adapters: each use swaps the slot and re-reads the evicted
    adapter from disk, and the tokens stay those of an engine that holds them all."""
    directory = checkpoints(SHAPE)
    _, tails = _prompts()
    expected = _run(_engine(directory, adapters), {f"r{i}": (tails[i], f"a{i}") for i in range(3)})
    engine = _engine(directory, adapters, max_loras=1, max_cpu_loras=1)
    for rid in ["r0", "r1", "r2", "r0", "r2"]:
        i = int(rid[1])
        assert _run(engine, {rid: (tails[i], f"a{i}")})[rid] == expected[rid]
        assert list(engine.runner.lora.cache) == [engine.loras.adapters[f"a{i}"].lora_int_id]
