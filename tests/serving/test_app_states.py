"""/health and the API while the engine loads and after it fails: the app in-process, with stand-in engines."""

import asyncio
import threading

import httpx
import pytest

from glmserve.engine.engine_client import AsyncEngineClient
from glmserve.serving.app import build_app
from glmserve.serving.state import ServerState
from glmserve.serving.templates import glm45_chat_template
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.tokenizer import save_test_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_test_tokenizer(directory)
    return Tokenizer(directory)


def _app(tokenizer, factory):
    client = AsyncEngineClient(factory)
    state = ServerState(client, tokenizer, glm45_chat_template(), ["m"], "/nowhere")
    return client, build_app(state)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_health_is_503_until_the_engine_is_ready(tokenizer):
    release = threading.Event()

    class Engine:  # just enough of LLMEngine for start-up
        max_model_len = 64
        generation_defaults = None
        kv_spec = None  # no KV pool to report

        class model_config:  # noqa: N801
            vocab_size = 1000

        class scheduler:  # noqa: N801
            @staticmethod
            def stats():
                from glmserve.engine.scheduler import SchedulerStats

                return SchedulerStats(0, 0, 0.0, 0, 0)

        @staticmethod
        def has_unfinished_requests():
            return False

    def factory():
        release.wait(10)
        return Engine()

    async def main():
        client, app = _app(tokenizer, factory)
        client.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
            loading = await http.get("/health")
            chat = await http.post("/v1/chat/completions", json=CHAT)
            models = await http.get("/v1/models")
            release.set()
            await client.wait_ready()
            ready = await http.get("/health")
        client.shutdown()
        return loading, chat, models, ready

    loading, chat, models, ready = asyncio.run(main())
    assert loading.status_code == chat.status_code == models.status_code == 503
    assert "loading" in loading.json()["error"]["message"]
    assert ready.status_code == 200


def test_health_is_503_when_the_engine_failed(tokenizer):
    def factory():
        raise RuntimeError("out of memory")

    async def main():
        client, app = _app(tokenizer, factory)
        client.start()
        with pytest.raises(Exception):
            await client.wait_ready()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
            return await http.get("/health"), await http.post("/v1/chat/completions", json=CHAT)

    health, chat = asyncio.run(main())
    assert health.status_code == chat.status_code == 503
    # The kind of failure only; its message (which could hold paths or addresses) is in the log.
    assert "RuntimeError" in health.json()["error"]["message"]
    assert "out of memory" not in health.json()["error"]["message"] + chat.text
