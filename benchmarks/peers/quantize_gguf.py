"""llama.cpp's own quantizer (`llama_model_quantize`, what the `llama-quantize` tool runs) on a GGUF, through
llama-cpp-python: the types convert_hf_to_gguf.py cannot write (q4_0, ...). Default parameters, as
`llama-quantize IN OUT Q4_0` uses them (so output.weight gets llama.cpp's usual higher-precision type). Run it with
the Python that has llama-cpp-python; it prints one JSON line: the tensor types of the result (gguf-py, from the
llama.cpp sources beside --converter).

    python quantize_gguf.py model-f32.gguf model-q4_0.gguf q4_0 --threads 2 --converter .../convert_hf_to_gguf.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path


def tensor_types(gguf: Path, converter: Path) -> dict:
    """{ggml type: {"tensors": n, "bytes": b}} of a GGUF file, read by llama.cpp's gguf-py."""
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    from gguf import GGUFReader

    types: dict[str, dict[str, int]] = {}
    for tensor in GGUFReader(str(gguf)).tensors:
        entry = types.setdefault(tensor.tensor_type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(tensor.n_bytes)
    return types


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="an f32, f16 or bf16 GGUF")
    p.add_argument("output", type=Path)
    p.add_argument("type", help="a llama_ftype as llama.cpp names it, less LLAMA_FTYPE_MOSTLY_: q4_0, q4_1, q5_0 ...")
    p.add_argument("--threads", type=int, default=0, help="0: all the machine's")
    p.add_argument("--converter", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py (for gguf-py)")
    args = p.parse_args()
    import llama_cpp as L

    ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{args.type.upper()}", None)
    if ftype is None:
        raise SystemExit(f"llama.cpp has no LLAMA_FTYPE_MOSTLY_{args.type.upper()}")
    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = args.threads
    rc = L.llama_model_quantize(str(args.input).encode(), str(args.output).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"tensor_types": tensor_types(args.output, args.converter)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
