"""A llama.cpp greedy batch decoder behind a JSON-lines pipe, run by the Python that has llama-cpp-python (its own
venv: this file imports neither glmserve nor torch).

Request  {"prompts": [[ids...], ...], "max_tokens": N}  ->  reply {"tokens": [[ids...], ...]}
(or {"error": "..."}). The first line written is {"ready": true, ...} once the model is loaded.

Decoding goes through the low-level llama_batch/llama_decode API: all prompts prefilled together (in chunks of
n_batch tokens), then one llama_decode per step with one token per sequence, each sequence its own seq_id; greedy
argmax, EOS ignored, no BOS added (the prompt ids are used exactly), the KV cache cleared before every request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Iterable, TextIO

import numpy as np


def serve(lines: Iterable[str], out: TextIO, generate: Callable[[list[list[int]], int], list[list[int]]]) -> None:
    """Answer each request line with one reply line; a failed request gets an error reply, not an exit."""
    for line in lines:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            reply = {"tokens": generate(request["prompts"], int(request["max_tokens"]))}
        except Exception as exc:  # the parent raises it; the worker stays usable
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Decoder:
    def __init__(self, gguf: str, threads: int, max_batch: int, ctx_per_seq: int, n_batch: int):
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
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        # llama.cpp caps n_batch at n_ctx: chunk the prefill by what it took.
        self.max_batch, self.n_batch, self.ctx_per_seq = max_batch, L.llama_n_batch(self.ctx), ctx_per_seq
        self.batch = L.llama_batch_init(max(self.n_batch, max_batch), 0, 1)
        self.context_params = {"n_ctx": L.llama_n_ctx(self.ctx), "n_batch": self.n_batch,
                               "n_ubatch": L.llama_n_ubatch(self.ctx), "n_seq_max": max_batch, "n_threads": threads,
                               "flash_attn_type": params.flash_attn_type, "kv_unified": params.kv_unified}

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-batch", type=int, required=True, help="n_seq_max: the most sequences in one request")
    p.add_argument("--ctx-per-seq", type=int, required=True, help="prompt + generated tokens per sequence, at most")
    p.add_argument("--n-batch", type=int, required=True, help="tokens per llama_decode call during the prefill")
    p.add_argument("--verbose", action="store_true", help="let llama.cpp log more than errors")
    args = p.parse_args()
    # The replies own stdout: anything native code prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    decoder = Decoder(args.gguf, args.threads, args.max_batch, args.ctx_per_seq, args.n_batch)
    out.write(json.dumps({"ready": True, "llama_cpp_version": llama_cpp.__version__, "n_vocab": decoder.n_vocab,
                          "context_params": decoder.context_params,
                          "system_info": llama_cpp.llama_print_system_info().decode()}) + "\n")
    out.flush()
    serve(sys.stdin, out, decoder.generate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
