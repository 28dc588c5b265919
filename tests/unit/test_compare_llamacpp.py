"""benchmarks/compare_llamacpp.py without llama.cpp: the skip when llama-cpp-python is missing, and the worker pipe
(LlamaCppEngine talking to the worker's own request loop, over a fake decoder)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "compare_llamacpp.py"

FAKE_WORKER = f"""
import json, sys
sys.path.insert(0, {str(BENCHMARKS / "peers")!r})
from llamacpp_worker import serve

def generate(prompts, max_tokens):
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    return [[p[-1] + i for i in range(max_tokens)] for p in prompts]

def prefill(request):  # stands for the long-context kinds: a request with its key goes to its handler
    if not request["prefill"]:
        raise ValueError("empty prompt")
    return {{"first_token": request["prefill"][-1] + 1, "saved": request["save"]}}

print(json.dumps({{"ready": True, "argv": sys.argv[1:]}}), flush=True)
serve(sys.stdin, sys.stdout, generate, {{"prefill": prefill}})
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "bench-57m", *args], capture_output=True, text=True,
                          timeout=60)


def test_skips_without_llama_python(tmp_path):
    missing = tmp_path / "nowhere" / "python"
    done = _run("--llama-python", str(missing))
    assert done.returncode == 0, done.stderr
    assert f"llama-cpp-python not installed at {missing}: skipping" in done.stdout


def test_skips_when_llama_cpp_does_not_import(tmp_path):
    python = tmp_path / "python"  # a "Python" on which `import llama_cpp` fails
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'llama_cpp'\" >&2\nexit 1\n")
    python.chmod(0o755)
    done = _run("--llama-python", str(python))
    assert done.returncode == 0, done.stderr
    assert "skipping" in done.stdout


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from peers.llamacpp import LlamaCppEngine

    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    e = LlamaCppEngine("llama.cpp-f32", Path(sys.executable), Path("model.gguf"), threads=2, max_batch=4,
                       ctx_per_seq=64, n_batch=512, worker=worker)
    yield e
    e.close()


def test_engine_round_trip(engine):
    assert engine.info["argv"] == ["model.gguf", "--threads", "2", "--max-batch", "4", "--ctx-per-seq", "64",
                                   "--n-batch", "512"]
    assert engine.generate([[1, 2], [3, 10]], 3) == [[2, 3, 4], [10, 11, 12]]
    with pytest.raises(RuntimeError, match="ValueError: max_tokens must be positive"):
        engine.generate([[1]], 0)
    assert engine.generate([[5]], 1) == [[5]]  # a failed request leaves the worker usable
    engine.close()
    assert engine.proc.returncode == 0


def test_engine_requests_go_to_their_handlers(engine):
    assert engine.request({"prefill": [4, 7], "save": "s.state"}) == {"first_token": 8, "saved": "s.state"}
    with pytest.raises(RuntimeError, match="ValueError: empty prompt"):
        engine.request({"prefill": [], "save": "s.state"})
    assert engine.generate([[1]], 2) == [[1, 2]]  # a request without a handler's key is still a batch


def test_engine_reports_a_dead_worker(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from peers.llamacpp import LlamaCppEngine

    worker = tmp_path / "dying_worker.py"
    worker.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match=r"worker exited \(status 3\)"):
        LlamaCppEngine("llama.cpp-bf16", Path(sys.executable), Path("m.gguf"), 1, 1, 8, 8, worker=worker)


FAKE_LLAMA_PYTHON = """#!/bin/sh
# A stand-in for the llama-cpp-python venv's python: the converter and the quantizer write their output file
# (named after the argument that follows --outfile, or the quantizer's second positional) and log the call.
echo "$@" >> "$(dirname "$0")/calls.log"
case "$1" in
  *convert_gguf.py) while [ "$1" != "--outfile" ]; do shift; done; echo converted > "$2" ;;
  *quantize_gguf.py) echo quantized > "$3"; echo '{"tensor_types": {"Q4_0": {"tensors": 2, "bytes": 10}}}' ;;
esac
"""


def test_q4_0_is_quantized_from_the_f32_gguf_and_cached(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from peers.llamacpp import ensure_gguf

    python = tmp_path / "python"
    python.write_text(FAKE_LLAMA_PYTHON)
    python.chmod(0o755)
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    path, commands, types = ensure_gguf(python, converter, checkpoint, "q4_0", tmp_path / "gguf", threads=2)
    assert path.read_text() == "quantized\n" and path.name.endswith("-q4_0.gguf")
    assert [Path(c[1]).name for c in commands] == ["convert_gguf.py", "quantize_gguf.py"]
    f32 = commands[0][commands[0].index("--outfile") + 1]
    assert commands[1][2] == str(Path(f32).with_suffix(".gguf"))  # the quantizer reads the finished f32 GGUF
    assert commands[1][4:7] == ["q4_0", "--threads", "2"]
    assert types == {"Q4_0": {"tensors": 2, "bytes": 10}}
    calls = (tmp_path / "calls.log").read_text().count("\n")
    again = ensure_gguf(python, converter, checkpoint, "q4_0", tmp_path / "gguf")
    assert again == (path, [], types)  # cached, with the tensor types kept beside it
    assert (tmp_path / "calls.log").read_text().count("\n") == calls


@pytest.mark.parametrize("text", ["int8:q8_0", "fp32:f32", "fp16:bf16", "q4_0:q4_0"])
def test_pairs_parse(text, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from compare_llamacpp import pair

    assert pair(text) == tuple(text.split(":"))


@pytest.mark.parametrize("text", ["int8", "int9:q8_0", "int8:q3_k", ":f32"])
def test_bad_pairs_are_refused(text, monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from compare_llamacpp import pair

    with pytest.raises(argparse.ArgumentTypeError):
        pair(text)
