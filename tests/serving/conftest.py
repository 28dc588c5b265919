"""Real `python -m glmserve serve` processes on 127.0.0.1, driven over HTTP.

One server per session does most of the work: it runs the model card's vLLM command (local checkpoint, tp 1) plus
test flags, and a scripted runner that makes the model say what a test needs when the prompt carries a marker
(serving_script.py); prompts without a marker run the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from serving_script import SCRIPT

from glmserve.serving.templates import glm45_chat_template
from glmserve.testing.checkpoint import write_random_checkpoint
from glmserve.testing.server import run_glmserve, start_server  # noqa: F401  (test modules import them from here)

API_KEY = "test-key-123"
MODEL_NAME = "glm-4.5-air"
MAX_MODEL_LEN = 2048
VLLM_CARD_FLAGS = ["--tensor-parallel-size", "1", "--tool-call-parser", "glm45", "--reasoning-parser", "glm45",
                   "--enable-auto-tool-choice", "--served-model-name", MODEL_NAME]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("air"), "air", chat_template=glm45_chat_template())


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    script = tmp / "script.json"
    script.write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
    args = [str(checkpoint), *VLLM_CARD_FLAGS, "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
            "--num-kv-blocks", "256", "--scripted-output-file", str(script)]
    srv = start_server(args, tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def metric(text: str, name: str, default: float | None = None) -> float:
    """A sample's value in Prometheus text (`name` may carry labels), or the sum over all of a name's labels."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    if not values and default is None:
        raise KeyError(name)
    return sum(values) if values else default
