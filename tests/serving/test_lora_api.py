"""LoRA adapters through a real server: vLLM's flags and routes, SGLang's --lora-paths and `lora_path`, every API
naming an adapter as its model, runtime load/unload, and the errors."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from glmserve.testing.checkpoint import SHAPES
from glmserve.testing.lora import write_random_adapter
from glmserve.testing.server import run_glmserve, start_server

BASE = "air-base"


@pytest.fixture(scope="module")
def lora_server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    for i, (rank, targets) in enumerate([(8, ("attn",)), (4, ("attn", "mlp", "experts")), (16, ("mlp",))]):
        write_random_adapter(tmp / f"a{i}", SHAPES["air"], rank, targets, seed=i, magnitude=3.0)
    args = [str(checkpoint), "--served-model-name", BASE, "--num-kv-blocks", "256", "--max-model-len", "1024",
            "--enable-lora", "--max-loras", "2", "--lora-modules", f"a0={tmp / 'a0'}",
            json.dumps({"name": "a1", "path": str(tmp / "a1"), "base_model_name": BASE}),
            "--lora-paths", f"s0={tmp / 'a0'}",
            "--inject-step-delay-ms", "10"]  # steps of 10 ms at least: a 400-token stream runs for seconds
    srv = start_server(args, tmp / "server.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield srv, tmp
    srv.stop()


def _complete(client: openai.OpenAI, model: str, **extra) -> str:
    return client.completions.create(model=model, prompt="hello there world", max_tokens=8, temperature=0.0,
                                     extra_body={"ignore_eos": True, **extra}).choices[0].text


def test_models_and_generation_per_adapter(lora_server):
    srv, _ = lora_server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "a0", "a1", "s0"}
    assert cards["a0"].parent == cards["s0"].parent == BASE and cards[BASE].parent is None
    texts = {name: _complete(client, name) for name in (BASE, "a0", "a1")}
    assert len(set(texts.values())) == 3  # each adapter changes the output
    assert _complete(client, "s0") == texts["a0"]  # the same adapter under its SGLang name
    assert _complete(client, BASE, lora_path="a1") == texts["a1"]  # SGLang's request field
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "a1"
    message = anthropic.Anthropic(base_url=srv.url, api_key="x").messages.create(
        model="a1", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert message.model == "a1"
    assert client.responses.create(model="a0", input="hi", max_output_tokens=4).model == "a0"
    with pytest.raises(openai.NotFoundError) as e:
        _complete(client, "nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        _complete(client, BASE, lora_path="nope")


def test_runtime_load_unload_and_errors(lora_server):
    srv, tmp = lora_server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
    post = lambda path, body: httpx.post(f"{srv.url}/v1/{path}", json=body, timeout=30)  # noqa: E731
    write_random_adapter(tmp / "big", SHAPES["air"], 32, ("attn",), seed=5)
    write_random_adapter(tmp / "late", SHAPES["air"], 4, ("attn",), seed=6, magnitude=3.0)
    for body, message in [({"lora_name": "x", "lora_path": str(tmp / "missing")}, "does not exist"),
                          ({"lora_name": "x", "lora_path": str(tmp / "big")}, "above --max-lora-rank 16"),
                          ({"lora_name": "a0", "lora_path": str(tmp / "late")}, "already loaded")]:
        r = post("load_lora_adapter", body)
        assert r.status_code == 400 and message in r.json()["error"]["message"]

    # Loaded while a request of another adapter streams; it serves the next request.
    with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=60,
                      json={"model": "a1", "prompt": "count", "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as running:
        lines = running.iter_lines()  # (kept: a dropped iterator closes the stream, which aborts the request)
        next(lines)
        assert post("load_lora_adapter", {"lora_name": "late", "lora_path": str(tmp / "late")}).status_code == 200
        assert "late" in {m.id for m in client.models.list().data}
        assert _complete(client, "late") != _complete(client, BASE)
        r = post("unload_lora_adapter", {"lora_name": "a1"})  # in use by the stream: refused
        assert r.status_code == 409 and "in use" in r.json()["error"]["message"]
        assert list(lines)[-2] == "data: [DONE]"  # the stream ran on to its end
    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late")
    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 404


def test_bad_start_up_adapter_stops_the_server(checkpoint, tmp_path):
    process = run_glmserve(["serve", str(checkpoint), "--enable-lora", "--lora-modules",
                            f"bad={tmp_path / 'nowhere'}"], tmp_path / "log")
    assert process.wait(timeout=60) != 0
    log = (tmp_path / "log").read_text()
    assert "--lora-modules bad=" in log and "does not exist" in log
