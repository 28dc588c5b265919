"""Tensor parallelism on torch.distributed (gloo, 2 CPU processes): the sharded model's logits equal tp=1's, and the
engine's tokens, structured output included, equal one process's."""

import pytest
import torch
import torch.multiprocessing as mp

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import AttentionMetadata
from glmserve.testing.server import free_port


def _logits(directory: str, tp: int, ep: bool = False, quantization: str | None = None) -> torch.Tensor:
    runner = ModelRunner(ModelConfig.from_pretrained(directory),
                         EngineConfig(model=directory, num_kv_blocks=8, tensor_parallel_size=tp,
                                      enable_expert_parallel=ep, quantization=quantization), progress=False)
    if ep:  # whole experts, half of them on each rank
        from glmserve.layers.moe import FusedExperts

        held = [m.expert_ids for m in runner.model.modules() if isinstance(m, FusedExperts)]
        assert held and all(r == range(8 * runner.parallel.tp_rank, 8 * runner.parallel.tp_rank + 8) for r in held)
    tokens = torch.arange(3, 40) % 1000
    meta = AttentionMetadata.build([0], [len(tokens)], [[0, 1, 2]], runner.block_size, runner.device)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(tokens, torch.arange(len(tokens)), meta))


def _worker(rank: int, directory: str, port: int, ep: bool, results, quantization: str | None = None) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    results[rank] = _logits(directory, tp=2, ep=ep, quantization=quantization)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("ep", [False, True], ids=["tensor-parallel", "expert-parallel"])
def test_tp2_logits_equal_tp1(checkpoints, ep):
    """Experts sliced (tensor parallel) or split whole, 8 per rank (expert parallel)."""
    directory = str(checkpoints("glm45"))
    expected = _logits(directory, tp=1)
    for rank_logits in _tp2_logits(directory, ep):
        assert (rank_logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ep", [False, True], ids=["tensor-parallel", "expert-parallel"])
def test_tp2_fp8_checkpoint_logits_equal_tp1(checkpoints, tmp_path, ep, monkeypatch):
    """An FP8 checkpoint held in fp8, its blocks of 16 inputs whole in every shard: each rank keeps its slice of the
    fp8 values and scales, so the sum over ranks is tp=1's (on the native kernels, fp32 activations; the ranks
    inherit the setting)."""
    monkeypatch.setenv("GLMSERVE_PREFILL_GEMM", "0")
    from glmserve.testing.checkpoint import write_fp8_checkpoint

    directory, _ = write_fp8_checkpoint(tmp_path / "fp8", checkpoints("glm45"), (24, 16))
    expected = _logits(str(directory), tp=1)
    for rank_logits in _tp2_logits(str(directory), ep):
        assert (rank_logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method,ep", [("int8", False), ("int4", True)])
def test_tp2_quantized_logits_stay_as_close_to_fp32_as_tp1(checkpoints, method, ep):
    """int8 / int4 quantize each rank's shard (a row-parallel shard's groups start at its own first input), so the
    ranks' rounding differs from tp=1's: both are held to the same bound from fp32 (test_quantization.py)."""
    from test_quantization import BOUNDS

    directory = str(checkpoints("glm45"))
    fp32 = _logits(directory, tp=1)
    for logits in [_logits(directory, tp=1, quantization=method), *_tp2_logits(directory, ep, method)]:
        assert ((logits - fp32).pow(2).mean().sqrt() / fp32.std()).item() <= BOUNDS[method][0]


def _tp2_logits(directory: str, ep: bool, quantization: str | None = None) -> list[torch.Tensor]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, directory, port, ep, results, quantization)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        return [results[rank] for rank in range(2)]


PROMPTS = {"a": list(range(5, 40)), "b": list(range(100, 109)), "c": list(range(300, 350))}
# Held to grammars whose every output ends (no free strings: random weights would not end one).
RECORD = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}, "tone": {"enum": ["red", "green", "blue"]}},
          "required": ["n", "ok", "tone"]}
ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                     "mode": {"enum": ["soft", "loud"]}}, "required": ["hour", "mode"]}}}


def constrained_requests(directory: str) -> dict:
    """name -> (prompt, params): a JSON schema greedy and seeded, and a named tool call in GLM-4.5's syntax.
    Compiled before the engine starts: its other ranks wait for the first step only --step-timeout seconds."""
    from glmserve.serving.structured_output import GrammarSpec, StructuredOutputCompiler
    from glmserve.serving.tokenizer import Tokenizer
    from glmserve.serving.tool_grammar import tool_call_grammar
    from glmserve.types import SamplingParams

    compiler, vocab = StructuredOutputCompiler(Tokenizer(directory)), ModelConfig.from_pretrained(directory).vocab_size
    record = compiler.compile_now(GrammarSpec("json_schema", RECORD, "t"), vocab)
    alarm = compiler.compile_now(tool_call_grammar([ALARM], "set_alarm", False, parallel=False), vocab)
    return {"json": (list(range(400, 420)), SamplingParams(temperature=0.0, max_tokens=80, grammar=record)),
            "json-seeded": (list(range(420, 433)), SamplingParams(temperature=1.0, seed=3, max_tokens=80,
                                                                  grammar=record)),
            "tool": (list(range(440, 460)), SamplingParams(temperature=0.0, max_tokens=80, grammar=alarm))}


def check_constrained(directory: str, out: dict[str, list[int]]) -> None:
    """Each constrained output ended and validates: the JSON against its schema, the call against its tool's."""
    import json

    import jsonschema

    from glmserve.serving.parsers.glm45_tools import parse_tool_calls
    from glmserve.serving.tokenizer import Tokenizer

    tokenizer = Tokenizer(directory)
    for name in ("json", "json-seeded", "tool"):
        assert len(out[name]) < 80, (name, out[name])  # ended on a stop token the grammar allowed
    for name in ("json", "json-seeded"):
        jsonschema.validate(json.loads(tokenizer.decode(out[name][:-1])), RECORD)
    _, calls = parse_tool_calls("<tool_call>set_alarm\n" + tokenizer.decode(out["tool"][:-1]), [ALARM])
    assert [c["function"]["name"] for c in calls] == ["set_alarm"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), ALARM["function"]["parameters"])


def run_workload(engine, constrained: dict) -> dict[str, list[int]]:
    """Greedy requests (a, b), a seeded one (c), one aborted after 3 steps ("gone") and the `constrained_requests`,
    run to the end: each request's tokens (also the pipeline tests' workload)."""
    from glmserve.types import SamplingParams

    for name, prompt in PROMPTS.items():
        seeded = name == "c"
        params = SamplingParams(temperature=1.0 if seeded else 0.0, seed=7 if seeded else None, max_tokens=12,
                                ignore_eos=True)
        engine.add_request(name, prompt, params)
    engine.add_request("gone", list(range(50, 60)), SamplingParams(temperature=0.0, max_tokens=50))
    for name, (prompt, params) in constrained.items():
        engine.add_request(name, prompt, params)
    out: dict[str, list[int]] = {name: [] for name in PROMPTS}
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
        if steps == 3:
            engine.abort(["gone"])
    return out


def _generate(directory: str, tp: int, k: int, ep: bool = False) -> dict[str, list[int]]:
    """Greedy and seeded requests through the whole engine, with chunked prefill, MTP drafts and an abort."""
    from glmserve.engine.llm_engine import LLMEngine

    constrained = constrained_requests(directory)
    engine = LLMEngine(EngineConfig(model=directory, num_kv_blocks=64, max_num_batched_tokens=24,
                                    tensor_parallel_size=tp, enable_expert_parallel=ep,
                                    num_speculative_tokens=k), progress=False)
    try:
        if tp > 1:  # really several processes
            assert len(engine.runner.workers) == tp - 1 and all(w.is_alive() for w in engine.runner.workers)
        out = run_workload(engine, constrained)
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # nothing leaked on any path
    finally:
        engine.close()
    check_constrained(directory, out)
    return out


@pytest.mark.parametrize("k,ep", [(0, False), (2, False), (2, True)])
def test_tp2_engine_generates_what_tp1_does(checkpoints, k, ep):
    """The engine's own tensor parallelism (rank 0 starts rank 1 and broadcasts every step): the same greedy and
    seeded tokens as one process, through chunked prefill, MTP drafts (k=2), an abort and requests held to grammars
    (rank 0's matchers fill the bitmask every rank applies)."""
    directory = str(checkpoints("glm45"))
    torch.set_num_threads(2)
    expected = _generate(directory, tp=1, k=k)
    got = _generate(directory, tp=2, k=k, ep=ep)
    assert got == expected and all(len(got[name]) == 12 for name in PROMPTS)


def test_a_dead_rank_fails_the_engine_instead_of_hanging(checkpoints):
    """A rank that dies (killed here) makes rank 0's next collective raise: the engine fails, which the server
    turns into errors for the requests in flight and exit code 1, rather than waiting out the collective timeout."""
    import time

    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(checkpoints("glm45")), num_kv_blocks=16, tensor_parallel_size=2),
                       progress=False)
    (worker,) = engine.runner.workers
    worker.kill()
    worker.join(timeout=10)
    engine.add_request("a", list(range(5, 20)), SamplingParams(temperature=0.0, max_tokens=4))
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30


def test_a_hung_rank_fails_the_engine_at_the_step_timeout(checkpoints):
    """A rank that hangs (stopped here) used to hold rank 0 in its collective for gloo's 10 minutes. Now the step
    fails at --step-timeout, and the stopped rank is killed (SIGKILL ends a stopped process; SIGTERM would not)."""
    import os
    import signal
    import time

    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(checkpoints("glm45")), num_kv_blocks=16, tensor_parallel_size=2,
                                    step_timeout=2), progress=False)
    (worker,) = engine.runner.workers
    assert engine.keep_alive_interval == pytest.approx(2 / 3)
    engine.keep_alive()  # a round trip through a healthy rank
    os.kill(worker.pid, signal.SIGSTOP)
    engine.add_request("a", list(range(5, 20)), SamplingParams(temperature=0.0, max_tokens=4))
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            while engine.has_unfinished_requests():
                engine.step()
        assert 2 <= time.monotonic() - start < 10
        worker.join(timeout=5)
        assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    finally:
        if worker.is_alive():
            worker.kill()


def _recording_rank(rank: int, directory: str, port: int, results) -> None:
    """One rank of a tp 2 world started as torchrun starts it (rank 0 runs the engine and `run_workload`, rank 1
    the steps it broadcasts): every StepOutput this rank's runner computes, kept or not."""
    import os

    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.engine.tensor_parallel import run_worker_node

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    steps, execute = [], ModelRunner.execute

    def recorded(runner, scheduler_output):
        step = execute(runner, scheduler_output)
        steps.append((step.sampled_token_ids, step.draft_token_ids))
        return step

    ModelRunner.execute = recorded
    config = EngineConfig(model=directory, num_kv_blocks=64, max_num_batched_tokens=24, tensor_parallel_size=2,
                          num_speculative_tokens=2)
    if rank == 0:
        constrained = constrained_requests(directory)
        engine = LLMEngine(config, progress=False)
        out = run_workload(engine, constrained)
        engine.close()
        check_constrained(directory, out)
    else:
        run_worker_node(ModelConfig.from_pretrained(directory), config)
    results[rank] = steps


def test_every_tp_rank_samples_and_drafts_what_rank_0_does(checkpoints):
    """Only rank 0's step output is used, so a rank that sampled or drafted otherwise (e.g. skipping the grammar's
    bitmask) would go unseen in the tokens: each rank's own outputs, tokens and MTP drafts, are compared here."""
    directory = str(checkpoints("glm45"))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_recording_rank, args=(r, directory, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert all(p.exitcode == 0 for p in procs)
        steps = [results[rank] for rank in range(2)]
    assert len(steps[0]) > 10 and steps[1] == steps[0]
