"""llama.cpp as a `glmserve.bench.offline.measure_batch` engine: a long-lived worker process (llamacpp_worker.py,
run by the Python that has llama-cpp-python) and the GGUF files it loads, converted once per checkpoint and type."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
WORKER = HERE / "llamacpp_worker.py"
CONVERT = HERE / "convert_gguf.py"
QUANTIZE = HERE / "quantize_gguf.py"


def llama_cpp_version(python: Path) -> str | None:
    """llama_cpp.__version__ as `python` imports it; None when that Python is missing or has no llama_cpp."""
    if not Path(python).is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def checkpoint_key(directory: Path) -> str:
    """Changes whenever the checkpoint's config or weight files do (a named shape is rewritten when it changes)."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# GGUF types llama.cpp's converter writes, and those its quantizer makes from the f32 GGUF.
CONVERTED_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZED_TYPES = ("q4_0",)


def ensure_gguf(python: Path, converter: Path, directory: Path, outtype: str, gguf_dir: Path,
                threads: int = 0) -> tuple[Path, list[list[str]], dict | None]:
    """The checkpoint as a GGUF of `outtype`, made unless already cached; the commands this call ran (none if
    cached), and for a quantized type the tensor types llama.cpp's quantizer chose (kept beside it; else None)."""
    path = gguf_dir / f"{directory.name}-{checkpoint_key(directory)}-{outtype}.gguf"
    types_file = path.with_suffix(".types.json")
    if path.is_file():
        return path, [], json.loads(types_file.read_text()) if types_file.is_file() else None
    if not converter.is_file():
        raise SystemExit(f"llama.cpp's converter not found at {converter}: it is in the llama-cpp-python sdist "
                         f"(pip download --no-deps --no-binary :all: llama-cpp-python==VERSION, unpack, "
                         f"vendor/llama.cpp/convert_hf_to_gguf.py); pass it with --converter")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # an interrupted conversion is never taken for a cached one
    commands, types = [], None
    if outtype in QUANTIZED_TYPES:
        source, commands, _ = ensure_gguf(python, converter, directory, "f32", gguf_dir, threads)
        command = [str(python), str(QUANTIZE), str(source), str(partial), outtype, "--threads", str(threads),
                   "--converter", str(converter)]
        print(f"quantizing {source.name} to {outtype} with llama.cpp's quantizer ...", flush=True)
        types = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["tensor_types"]
        types_file.write_text(json.dumps(types, indent=2))
    else:
        command = [str(python), str(CONVERT), "--converter", str(converter), str(directory), "--outtype", outtype,
                   "--outfile", str(partial)]
        print(f"converting {directory} to {outtype} GGUF ...", flush=True)
        subprocess.run(command, check=True)
    partial.rename(path)
    return path, [*commands, command], types


class LlamaCppEngine:
    """Greedy batched decoding in a llama.cpp worker; `generate` sends one request and waits for its reply."""

    def __init__(self, name: str, python: Path, gguf: Path, threads: int, max_batch: int, ctx_per_seq: int,
                 n_batch: int, worker: Path = WORKER, extra_args: list[str] = ()):
        self.name = name
        self.command = [str(python), str(worker), str(gguf), "--threads", str(threads), "--max-batch",
                        str(max_batch), "--ctx-per-seq", str(ctx_per_seq), "--n-batch", str(n_batch), *extra_args]
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pids = (self.proc.pid,)  # measure_batch: the worker's CPU is the measured work, not noise
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the llama.cpp worker exited (status {self.proc.wait()}); "
                               f"its stderr is above. Command: {' '.join(self.command)}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def request(self, request: dict) -> dict:
        """One request line to the worker (see llamacpp_worker.py for the kinds), its reply."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self.request({"prompts": prompts, "max_tokens": max_tokens})["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()  # the worker's loop ends at EOF
        self.proc.wait()
