"""Pipeline parallelism and several nodes (gloo, CPU processes, 1 thread each): the same tokens as one process,
and each pipeline stage holding only its layers' weights and KV cache.

"Nodes" are separate process trees that meet only at --dist-init-addr on 127.0.0.1: node 0 is the engine in this
process (it starts its node's other ranks), node 1 a `glmserve serve --headless` process (it starts its own)."""

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_tensor_parallel import PROMPTS, check_constrained, constrained_requests, run_workload

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.pipeline import split_micro_batches
from glmserve.model.glm4_moe import stage_layers
from glmserve.testing.server import free_port, run_glmserve

K = 2  # MTP drafts per step in every run


def test_stages_split_the_layers_evenly_earlier_stages_taking_the_remainder():
    assert [stage_layers(5, r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [stage_layers(7, r, 3) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [stage_layers(4, r, 4) for r in range(4)] == [range(r, r + 1) for r in range(4)]
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        stage_layers(2, 0, 3)


def test_micro_batches_are_contiguous_runs_of_chunks_with_even_token_shares():
    assert split_micro_batches([1] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_micro_batches([30, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]  # a long prefill is never cut
    assert split_micro_batches([5], 2) == [range(0, 1)]
    assert split_micro_batches([1, 1, 1], 4) == [range(0, 1), range(1, 2), range(2, 3)]
    runs = split_micro_batches([3, 9, 2, 7, 7, 1, 4], 3)
    assert [i for run in runs for i in run] == list(range(7)) and len(runs) == 3


def _generate(directory: str, tp: int = 1, pp: int = 1, nnodes: int = 1, log: Path | None = None,
              micro_batch: int | None = None) -> dict:
    """Greedy and seeded requests through chunked prefill (24-token steps), MTP drafts, an abort and a prefix-cache
    hit; every KV block back in the pool at the end."""
    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    constrained = constrained_requests(directory)
    address = f"127.0.0.1:{free_port()}"
    others = []
    for node in range(1, nnodes):  # the other nodes, launched as an operator would
        others.append(run_glmserve(["serve", directory, "--headless", "--nnodes", str(nnodes), "--node-rank",
                                    str(node), "--dist-init-addr", address, "--tp", str(tp), "--pp", str(pp),
                                    "--num-kv-blocks", "64", "--speculative-algorithm", "MTP",
                                    "--speculative-num-steps", str(K), "--dist-timeout", "60"], log))
    engine = LLMEngine(EngineConfig(model=directory, num_kv_blocks=64, max_num_batched_tokens=24,
                                    tensor_parallel_size=tp, pipeline_parallel_size=pp, num_speculative_tokens=K,
                                    nnodes=nnodes, dist_init_addr=address if nnodes > 1 else None,
                                    dist_timeout=60, pp_max_micro_batch_size=micro_batch), progress=False)
    try:
        if tp * pp > 1:  # really several processes on this node
            assert len(engine.runner.workers) == tp * pp // nnodes - 1
        out = run_workload(engine, constrained)
        # a follow-up sharing a's first two blocks: a prefix-cache hit
        again = engine.add_request("a-again", PROMPTS["a"] + [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=6,
                                                                                          ignore_eos=True))
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert again.num_cached_tokens == 32
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # nothing leaked on any path
    finally:
        engine.close()
    for other in others:  # node 0's close stops every node
        assert other.wait(timeout=30) == 0
    check_constrained(directory, out)
    return out


@pytest.fixture(scope="module")
def expected(checkpoints):
    torch.set_num_threads(1)
    return _generate(str(checkpoints("glm45")))


@pytest.mark.parametrize("tp,pp,nnodes,micro_batch", [
    pytest.param(2, 1, 2, None, id="2-nodes-x-tp1"),
    # Four ranks on two cores (the suite's slowest test); 2-nodes-tp2-x-pp2 also spans nodes with four ranks.
    pytest.param(4, 1, 2, None, id="2-nodes-x-tp2", marks=pytest.mark.slow),
    pytest.param(1, 2, 1, None, id="pp2"),
    pytest.param(1, 2, 1, 1, id="pp2-micro-batches-of-1"),
    pytest.param(2, 2, 1, 2, id="tp2-x-pp2-micro-batches-of-2"),
    pytest.param(2, 2, 2, None, id="2-nodes-tp2-x-pp2")])
def test_parallel_engines_generate_what_one_process_does(checkpoints, expected, tmp_path, tp, pp, nnodes,
                                                         micro_batch):
    """Rank 0 broadcasts every step to the whole world; pipeline stages pass micro-batches' hidden states on, the
    last stage samples (with rank 0's grammar bitmask) and drafts. Greedy, seeded and constrained tokens equal one
    process's."""
    torch.set_num_threads(1)
    got = _generate(str(checkpoints("glm45")), tp, pp, nnodes, tmp_path / "node1.log", micro_batch)
    assert got == expected
    assert all(len(got[name]) == 12 for name in PROMPTS)


def _stage_report(rank: int, directory: str, address: str, tp: int, pp: int, results) -> None:
    from glmserve.distributed.rendezvous import open_store
    from glmserve.engine.model_runner import ModelRunner

    torch.set_num_threads(1)
    store = open_store(address, is_master=rank == 0, timeout=60)
    runner = ModelRunner(ModelConfig.from_pretrained(directory),
                         EngineConfig(model=directory, num_kv_blocks=8, tensor_parallel_size=tp,
                                      pipeline_parallel_size=pp, num_speculative_tokens=1), progress=False, rank=rank,
                         store=store)
    results[rank] = _holdings(runner)
    torch.distributed.destroy_process_group()


def _holdings(runner) -> dict:
    caches = [m.kv_cache for m in runner.model.modules() if getattr(m, "kv_cache", None) is not None]
    return {"params": {n: p.numel() for n, p in runner.model.named_parameters()},
            "kv_bytes": sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v)),
            "kv_layers": len(caches), "bytes_per_token": runner.kv_spec.bytes_per_token}


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_each_stage_holds_only_its_layers_weights_and_kv_cache(checkpoints, tp, pp):
    """glm45's 5 layers: stage 0 holds the embeddings and layers 0-2, stage 1 layers 3-4, the final norm, the LM head
    and the MTP layer (layer 5); each stage caches K and V of its own layers only (and the MTP layer's)."""
    directory = str(checkpoints("glm45"))
    torch.set_num_threads(1)
    from glmserve.engine.model_runner import ModelRunner

    whole = _holdings(ModelRunner(ModelConfig.from_pretrained(directory),
                                  EngineConfig(model=directory, num_kv_blocks=8, num_speculative_tokens=1),
                                  progress=False))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        address = f"127.0.0.1:{free_port()}"
        procs = [ctx.Process(target=_stage_report, args=(r, directory, address, tp, pp, results))
                 for r in range(tp * pp)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        ranks = [results[r] for r in range(tp * pp)]
    held = {0: ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(3))),
            1: (*(f"model.layers.{i}." for i in (3, 4, 5)), "model.norm.", "lm_head.")}
    for rank, report in enumerate(ranks):
        stage = rank // tp
        expected = {n: size for n, size in whole["params"].items() if n.startswith(held[stage])}
        assert set(report["params"]) == set(expected)
        if tp == 1:
            assert report["params"] == expected
        else:  # sharded: no parameter larger than tp 1's, the stage's linear layers split
            assert all(size <= expected[n] for n, size in report["params"].items())
            assert sum(report["params"].values()) < sum(expected.values())
        layers = 3  # stage 0: layers 0-2; stage 1: layers 3-4 and the MTP layer
        assert report["kv_layers"] == layers
        per_layer_token = whole["bytes_per_token"] // 6 // tp  # 5 layers + MTP; KV heads split across tp
        assert report["bytes_per_token"] == layers * per_layer_token
        assert report["kv_bytes"] == 8 * 16 * layers * per_layer_token  # 8 blocks of 16 tokens


@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_a_hung_or_dead_stage_fails_the_engine_within_the_step_timeout(checkpoints, fault):
    """pp 2: rank 0 (stage 0) waits for stage 1's hidden states to come back as the step's tokens. A stage that
    dies fails that wait at once; one that hangs (stopped) fails it at --step-timeout, not gloo's 10 minutes."""
    import os
    import signal
    import time

    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(checkpoints("glm45")), num_kv_blocks=16, pipeline_parallel_size=2,
                                    step_timeout=2), progress=False)
    (worker,) = engine.runner.workers
    engine.add_request("a", list(range(5, 20)), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    engine.step()  # the pipeline works
    os.kill(worker.pid, signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            while engine.has_unfinished_requests():
                engine.step()
        elapsed = time.monotonic() - start
        assert (1.5 <= elapsed if fault == "stop" else True) and elapsed < 10, elapsed
        worker.join(timeout=5)
        assert not worker.is_alive()
    finally:
        if worker.is_alive():
            worker.kill()
