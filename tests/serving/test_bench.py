"""`glmserve bench serve` against the session server, and `glmserve bench offline` on a tiny checkpoint.

These check what the benchmarks report and that the numbers hang together, never how fast anything is.
"""

import json

import pytest
from conftest import API_KEY, MODEL_NAME, run_glmserve, start_server

from glmserve.bench.roofline import params_per_decode_step, roofline_tps
from glmserve.testing.checkpoint import write_random_checkpoint


def bench(args: list[str], tmp_path, name: str) -> str:
    log = tmp_path / f"{name}.log"
    returncode = run_glmserve(["bench", *args], log).wait(timeout=300)
    output = log.read_text(errors="replace")
    assert returncode == 0, output
    return output


def serve_args(server, tmp_path, *args: str) -> list[str]:
    return ["serve", "--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "8", "--disable-tqdm",
            "--result-file", str(tmp_path / "result.json"), *args]


def check_level(r: dict, num_prompts: int, output_len: int) -> None:
    assert (r["completed"], r["failed"]) == (num_prompts, 0) and not any(r["errors"])
    assert r["output_lens"] == [output_len] * num_prompts
    assert r["total_output_tokens"] == num_prompts * output_len
    assert r["total_input_tokens"] == sum(r["input_lens"])
    assert r["request_throughput"] == pytest.approx(num_prompts / r["duration"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / r["duration"])
    for ttft, itl, e2el in zip(r["ttfts"], r["itls"], r["e2els"]):
        assert 0 < ttft <= e2el <= r["duration"]
        assert len(itl) <= output_len - 1 and ttft + sum(itl) <= e2el
    for name in ("ttft", "tpot", "itl", "e2el"):
        if name == "itl" and not any(r["itls"]):
            # Every response came in one chunk (the server merges the tokens a slower stream has not sent yet, as
            # vLLM's does; a fast step on a tiny model can finish a request first): no gaps, reported as 0.
            assert r["median_itl_ms"] == r["p99_itl_ms"] == 0.0
            continue
        assert 0 < r[f"median_{name}_ms"] <= r[f"p90_{name}_ms"] <= r[f"p99_{name}_ms"]
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    assert r["median_tpot_ms"] <= r["median_e2el_ms"]


def test_serve_random_dataset_sweeps_concurrency(server, checkpoint, tmp_path):
    output = bench(serve_args(server, tmp_path, "--endpoint", "/v1/completions", "--random-input-len", "16",
                              "--random-output-len", "8", "--ignore-eos", "--max-concurrency", "1", "4",
                              "--goodput", "e2el:600000", "--plot", str(tmp_path / "sweep.png")), tmp_path, "random")
    assert output.count("Serving Benchmark Result") == 2 and "(medians)" in output
    result = json.loads((tmp_path / "result.json").read_text())
    # The model and, through the model card's root, its tokenizer come from the server.
    assert (result["model_id"], result["tokenizer_id"]) == (MODEL_NAME, str(checkpoint))
    assert [r["max_concurrency"] for r in result["results"]] == [1, 4]
    for r in result["results"]:
        check_level(r, 8, 8)
        assert r["input_lens"] == [16] * 8  # token-id prompts: exact lengths
        assert r["request_goodput"] == r["request_throughput"]  # a 10-minute SLO every request meets
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def paced_server(checkpoint, tmp_path_factory):
    """A server whose steps take at least 20 ms, so its stream's chunks come a step apart on any machine (on a
    fast one, ~1 ms steps outrun the stream's reader, which then gets several tokens per chunk)."""
    srv = start_server([str(checkpoint), "--api-key", API_KEY, "--inject-step-delay-ms", "20"],
                       tmp_path_factory.mktemp("paced") / "server.log")
    yield srv
    srv.stop()


def test_serve_counts_token_ids_as_arrivals_with_extra_body(paced_server, tmp_path):
    """With return_token_ids (through --extra-body) every chunk of tokens counts as it arrives, text or not (random
    weights on a small tokenizer often produce no text until the end); a chunk may carry two tokens when the
    stream's reader lags a step."""
    bench(serve_args(paced_server, tmp_path, "--endpoint", "/v1/completions", "--random-input-len", "16",
                     "--random-output-len", "8", "--ignore-eos", "--max-concurrency", "1",
                     "--extra-body", '{"return_token_ids": true}'), tmp_path, "token-ids")
    (r,) = json.loads((tmp_path / "result.json").read_text())["results"]
    check_level(r, 8, 8)
    assert all(3 <= len(itl) <= 7 for itl in r["itls"])


def test_serve_chat_dataset(server, tmp_path):
    bench(serve_args(server, tmp_path, "--dataset-name", "chat", "--chat-output-len", "8", "--ignore-eos"),
          tmp_path, "chat")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["endpoint"] == "/v1/chat/completions" and result["backend"] == "openai-chat"
    (r,) = result["results"]
    check_level(r, 8, 8)
    assert min(r["input_lens"]) > 16 and len(set(r["input_lens"])) > 1  # whole conversations, of varied length


def test_serve_refuses_a_malformed_goodput_slo(tmp_path):
    log = tmp_path / "goodput.log"
    assert run_glmserve(["bench", "serve", "--goodput", "latency:5"], log).wait(timeout=60) == 2
    assert "the metric must be ttft, tpot or e2el" in log.read_text()


def test_offline_reports_prefill_decode_and_roofline(tmp_path):
    directory = write_random_checkpoint(tmp_path / "tiny", "glm45")
    out = tmp_path / "offline.json"
    output = bench(["offline", str(directory), "--batch-size", "1", "2", "--input-len", "8", "--output-len", "4",
                    "--num-iters", "1", "--threads", "1", "--engines", "glmserve", "transformers",
                    "glmserve-fp16", "--bandwidth-gib", "0.01", "--output-json", str(out)],
                   tmp_path, "offline")
    assert "roofline tok/s" in output
    report = json.loads(out.read_text())
    assert report["workload"] | {"input_len": 8, "output_len": 4, "ignore_eos": True} == report["workload"]
    assert report["bandwidth"]["roofline_GBps"] > 0
    params = report["checkpoint"]["params"]
    assert params_per_decode_step(params, 1) == pytest.approx(params["per_decode_token"])
    assert params_per_decode_step(params, 10_000) == pytest.approx(  # every routed expert is read
        params["per_decode_token"] + params["routed_experts"] * (1 - 4 / 16))
    assert [e["batch"] for e in report["results"]] == [1, 2]
    for entry in report["results"]:
        glm = entry["glmserve"]
        assert glm["median_prefill_tps"] == pytest.approx(entry["batch"] * 8 / glm["median_prefill_s"])
        assert glm["median_decode_tps"] > 0 and len(glm["decode_tps"]) == 1
        versus = entry["comparisons"]["transformers"]
        assert versus["ratio"] == pytest.approx(glm["median_decode_tps"] / entry["transformers"]["median_decode_tps"])
        assert versus["greedy_mismatched_sequences"] == 0  # the same checkpoint, greedy: the same tokens
        assert entry["glmserve-fp16"]["median_decode_tps"] > 0 and "glmserve-fp16" in entry["comparisons"]
    one, two = (e["roofline_tps"] for e in report["results"])
    assert one < two < 2 * one  # batch 2 reads more experts per step, but not twice the weights
    # With every weight a step reads stored in fp16, the step reads half the bytes of fp32.
    everything = params_per_decode_step(params, 1)
    half = roofline_tps(params, 1, 4, 10.0, fp16_params=everything)
    assert half == pytest.approx(2 * roofline_tps(params, 1, 4, 10.0))
    # The same with the routed experts counted apart, at any batch: the experts a step reads, in fp16 too.
    for batch in (1, 5):
        per_token_routed = params["routed_experts"] * params["num_experts_per_tok"] // params["n_routed_experts"]
        not_routed = params["per_decode_token"] - per_token_routed
        assert roofline_tps(params, batch, 4, 10.0, fp16_params=not_routed, fp16_experts=True) == pytest.approx(
            2 * roofline_tps(params, batch, 4, 10.0))


def test_server_engines_are_measured_and_compared(server):
    """The peer comparisons' machinery on the session server, twice under two names: greedy token ids come back
    through return_token_ids, each engine is measured per repetition, and the second is compared with the first."""
    from argparse import Namespace

    from glmserve.bench.engines import ServerEngine
    from glmserve.bench.offline import measure_batch

    engines = [ServerEngine(name, server.url, MODEL_NAME, (server.process.pid,), API_KEY) for name in ("a", "b")]
    prompts = [[5 + i, 17, 29, 31 + i] for i in range(3)]
    args = Namespace(num_iters=2, retries=0, max_other_load=99.0, quiet_wait=0.0, input_len=4, output_len=5)
    entry = measure_batch(args, engines, prompts)
    assert entry["batch"] == 3
    # Timings only exist and are counted here: with 5 tokens, full minus prefill run is noise, not a rate.
    assert all(len(entry[n]["decode_tps"]) == len(entry[n]["total_s"]) == 2 for n in ("a", "b"))
    assert all(min(entry[n]["prefill_s"] + entry[n]["total_s"]) > 0 for n in ("a", "b"))
    # The second engine is compared with the first, sequence by sequence. Token equality is not asserted: the two
    # runs' batch composition may differ, and with it a near-tie on random weights.
    assert len(entry["comparisons"]["b"]["first_divergence"]) == 3 and "a" not in entry["comparisons"]
    tokens = engines[0].generate(prompts, 5)
    assert [len(t) for t in tokens] == [5, 5, 5]


def test_serve_names_the_lora_modules_in_turn(server, tmp_path):
    """--lora-modules: request i names the (i mod n)-th; here the base model and a name the server lacks, so every
    second request fails with the server's 404 and the others complete."""
    log = tmp_path / "lora.log"
    args = serve_args(server, tmp_path, "--random-input-len", "8", "--random-output-len", "2", "--ignore-eos",
                      "--lora-modules", MODEL_NAME, "no-such-adapter")
    assert run_glmserve(["bench", *args], log).wait(timeout=300) == 1, log.read_text()  # failures: exit 1
    (r,) = json.loads((tmp_path / "result.json").read_text())["results"]
    assert (r["completed"], r["failed"]) == (4, 4)
    assert [bool(e) for e in r["errors"]] == [False, True] * 4
    assert all("no-such-adapter" in e for e in r["errors"][1::2])
