"""A llama.cpp greedy batch decoder behind a JSON-lines pipe, run by the Python that has llama-cpp-python (its own
venv: this file imports neither glmserve nor torch).

Request  {"prompts": [[ids...], ...], "max_tokens": N}  ->  reply {"tokens": [[ids...], ...]}
(or {"error": "..."}). The first line written is {"ready": true, ...} once the model is loaded.

Long contexts, prefilled once and decoded many times (compare_llamacpp.py --context):
  {"prefill": [ids...], "save": PATH}  ->  {"first_token": t, "prefill_s": s, "prefill_cpu_s": s, "state_bytes": n}:
      one sequence prefilled, its KV cache saved to PATH (llama_state_seq_save_file);
  {"decode_from": PATH, "first_token": t, "max_tokens": N}  ->  {"tokens": [...], "step_s": [...], ...}:
      that KV cache loaded back, then N greedy decode steps after it, each timed (wall and process CPU).

Decoding goes through the low-level llama_batch/llama_decode API: all prompts prefilled together (in chunks of
n_batch tokens), then one llama_decode per step with one token per sequence, each sequence its own seq_id; greedy
argmax, EOS ignored, no BOS added (the prompt ids are used exactly), the KV cache cleared before every request.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
import time
from typing import Callable, Iterable, TextIO

import numpy as np


def serve(lines: Iterable[str], out: TextIO, generate: Callable[[list[list[int]], int], list[list[int]]],
          handlers: dict[str, Callable[[dict], dict]] | None = None) -> None:
    """Answer each request line with one reply line; a failed request gets an error reply, not an exit. A request
    with a key of `handlers` goes to that handler; any other is a batch for `generate`."""
    for line in lines:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            handler = next((h for key, h in (handlers or {}).items() if key in request), None)
            reply = handler(request) if handler else {"tokens": generate(request["prompts"],
                                                                         int(request["max_tokens"]))}
        except Exception as exc:  # the parent raises it; the worker stays usable
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Decoder:
    def __init__(self, gguf: str, threads: int, max_batch: int, ctx_per_seq: int, n_batch: int,
                 type_k: str | None = None, type_v: str | None = None, flash_attn: str = "auto"):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = L.llama_context_default_params()
        params.n_ctx = max_batch * ctx_per_seq  # split evenly over the sequences (KV cache not unified)
        params.n_batch = n_batch
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if type_k:  # llama.cpp's default KV type is f16
            params.type_k = KV_TYPES[type_k]
        if type_v:
            params.type_v = KV_TYPES[type_v]
        params.flash_attn_type = FLASH_ATTN[flash_attn]  # a quantized V cache needs it on
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        # llama.cpp caps n_batch at n_ctx: chunk the prefill by what it took.
        self.max_batch, self.n_batch, self.ctx_per_seq = max_batch, L.llama_n_batch(self.ctx), ctx_per_seq
        self.batch = L.llama_batch_init(max(self.n_batch, max_batch), 0, 1)
        self.context_params = {"n_ctx": L.llama_n_ctx(self.ctx), "n_batch": self.n_batch,
                               "n_ubatch": L.llama_n_ubatch(self.ctx), "n_seq_max": max_batch, "n_threads": threads,
                               "flash_attn_type": params.flash_attn_type, "kv_unified": params.kv_unified,
                               "type_k": params.type_k, "type_v": params.type_v}

    def _decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> np.ndarray:
        """One llama_decode; the greedy token of every position with want=True, in batch order."""
        b, n = self.batch, len(tokens)
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = tokens
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(b.logits, shape=(n,))[:] = want
        for i, s in enumerate(seqs):
            b.seq_id[i][0] = s
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        if not any(want):  # a prefill chunk that ends no prompt
            return np.empty(0, dtype=np.int64)
        # Output rows are in the order their tokens appear in the batch.
        logits = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(sum(want), self.n_vocab))
        return logits.argmax(axis=1)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        if len(prompts) > self.max_batch or any(len(p) + max_tokens > self.ctx_per_seq for p in prompts):
            raise ValueError(f"at most {self.max_batch} sequences of {self.ctx_per_seq} tokens in all")
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), False)
        flat = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        first: list[int] = []
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start : start + self.n_batch]
            first += self._decode(*map(list, zip(*chunk))).tolist()
        out = [[t] for t in first]
        seqs = list(range(len(prompts)))
        for step in range(max_tokens - 1):
            last = [o[-1] for o in out]
            pos = [len(p) + step for p in prompts]
            for o, t in zip(out, self._decode(last, pos, seqs, [True] * len(seqs)).tolist()):
                o.append(t)
        return out

    def _prefill(self, prompt: list[int]) -> int:
        first = []
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start : start + self.n_batch]
            ends = start + len(chunk) == len(prompt)
            first += self._decode(chunk, list(range(start, start + len(chunk))), [0] * len(chunk),
                                  [ends and i == len(chunk) - 1 for i in range(len(chunk))]).tolist()
        return first[0]

    def prefill_and_save(self, request: dict) -> dict:
        prompt, path = request["prefill"], request["save"]
        if len(prompt) >= self.ctx_per_seq:
            raise ValueError(f"a {len(prompt)}-token prompt does not fit {self.ctx_per_seq} tokens per sequence")
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), False)
        t0, cpu0 = time.perf_counter(), _cpu_s()
        first = self._prefill(prompt)
        prefill_s, prefill_cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
        tokens = (self.L.llama_token * len(prompt))(*prompt)
        if not self.L.llama_state_seq_save_file(self.ctx, path.encode(), 0, tokens, len(prompt)):
            raise RuntimeError(f"llama_state_seq_save_file failed for {path}")
        return {"first_token": first, "prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu_s,
                "state_bytes": os.path.getsize(path)}

    def decode_from(self, request: dict) -> dict:
        path, last, max_tokens = request["decode_from"], int(request["first_token"]), int(request["max_tokens"])
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), False)
        t0 = time.perf_counter()
        count, capacity = ctypes.c_size_t(0), self.ctx_per_seq
        if not self.L.llama_state_seq_load_file(self.ctx, path.encode(), 0, (self.L.llama_token * capacity)(),
                                                capacity, ctypes.byref(count)):
            raise RuntimeError(f"llama_state_seq_load_file failed for {path}")
        load_s, context = time.perf_counter() - t0, count.value
        if context + max_tokens > self.ctx_per_seq:
            raise ValueError(f"{context} + {max_tokens} tokens do not fit {self.ctx_per_seq} per sequence")
        tokens, step_s, step_cpu_s = [], [], []
        for step in range(max_tokens):
            t0, cpu0 = time.perf_counter(), _cpu_s()
            last = int(self._decode([last], [context + step], [0], [True])[0])
            step_s.append(time.perf_counter() - t0)
            step_cpu_s.append(_cpu_s() - cpu0)
            tokens.append(last)
        return {"tokens": tokens, "context": context, "load_s": load_s, "step_s": step_s, "step_cpu_s": step_cpu_s}


KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


def _cpu_s() -> float:
    t = os.times()  # the whole process: llama.cpp's threads too
    return t.user + t.system


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-batch", type=int, required=True, help="n_seq_max: the most sequences in one request")
    p.add_argument("--ctx-per-seq", type=int, required=True, help="prompt + generated tokens per sequence, at most")
    p.add_argument("--n-batch", type=int, required=True, help="tokens per llama_decode call during the prefill")
    p.add_argument("--type-k", choices=list(KV_TYPES), help="K cache type (llama.cpp's default: f16)")
    p.add_argument("--type-v", choices=list(KV_TYPES), help="V cache type (llama.cpp's default: f16)")
    p.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="auto")
    p.add_argument("--verbose", action="store_true", help="let llama.cpp log more than errors")
    args = p.parse_args()
    # The replies own stdout: anything native code prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    decoder = Decoder(args.gguf, args.threads, args.max_batch, args.ctx_per_seq, args.n_batch, args.type_k,
                      args.type_v, args.flash_attn)
    out.write(json.dumps({"ready": True, "llama_cpp_version": llama_cpp.__version__, "n_vocab": decoder.n_vocab,
                          "context_params": decoder.context_params,
                          "system_info": llama_cpp.llama_print_system_info().decode()}) + "\n")
    out.flush()
    serve(sys.stdin, out, decoder.generate, {"prefill": decoder.prefill_and_save, "decode_from": decoder.decode_from})
    return 0


if __name__ == "__main__":
    sys.exit(main())
