"""What a new user reads first: `glmserve serve --help` names the default model, host and port and how to turn the
parsers off; `make serve` takes PORT= as it takes MODEL=."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_serve_help_names_the_defaults():
    result = subprocess.run([sys.executable, "-m", "glmserve", "serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for words in ("embedded glm-4.5-nano", "0.0.0.0:8000", "/v1/messages", "/v1/responses",
                  "--reasoning-parser none", "--tool-call-parser none"):
        assert words in text, words


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_takes_port_and_model():
    result = subprocess.run(["make", "-n", "serve", "PORT=9123", "MODEL=/models/x"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    serve = [line for line in result.stdout.splitlines() if "glmserve serve" in line]
    assert serve and serve[-1].endswith("glmserve serve /models/x --host 127.0.0.1 --port 9123"), result.stdout
