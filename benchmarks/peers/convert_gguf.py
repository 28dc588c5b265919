"""llama.cpp's convert_hf_to_gguf.py, imported and run with one change: a tokenizer whose pre-tokenizer hash it does
not know gets "glm4" (what the real GLM-4.5 tokenizer gets) instead of an error. glmserve's test checkpoints carry a
small byte-level BPE tokenizer with GLM-4.5's special tokens, which no hash matches; the benchmark feeds token ids,
so the pre-tokenizer never runs. Run it with the Python that has the converter's requirements (torch, transformers).

    python convert_gguf.py --converter .../vendor/llama.cpp/convert_hf_to_gguf.py MODEL_DIR --outtype bf16 \\
        --outfile model.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--converter", type=Path, required=True, help="path of llama.cpp's convert_hf_to_gguf.py")
    args, rest = p.parse_known_args()
    converter = args.converter.resolve()
    sys.path.insert(0, str(converter.parent))  # its `conversion` package sits beside it
    sys.argv = [str(converter), *rest]
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    from conversion.base import TextModel, logger

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        level = logger.level
        logger.setLevel(logging.ERROR)  # the unknown-hash banner: replaced by the one line below
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            pass
        finally:
            logger.setLevel(level)
        logger.warning("pre-tokenizer hash not recognised: using 'glm4', GLM-4.5's")
        return "glm4"

    TextModel.get_vocab_base_pre = vocab_base_pre
    module.main()


if __name__ == "__main__":
    main()
