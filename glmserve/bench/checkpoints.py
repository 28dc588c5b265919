"""The checkpoints `glmserve bench offline` measures: any checkpoint directory, or a named random-weight shape
written once (in the real Hugging Face layout) into a cache directory and reused."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from glmserve.testing.checkpoint import TinyShape, write_random_checkpoint

SHAPES: dict[str, TinyShape] = {
    # Exactly ../shared/reference/BENCH.md's reference checkpoint: 57.0M params.
    "bench-57m": TinyShape(
        hidden_size=512, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, use_qk_norm=True, vocab_size=32000, max_position_embeddings=4096,
        num_nextn_predict_layers=0),
    # Exactly ../shared/reference/BENCH.md's larger reference checkpoint: 528M params, 165M active.
    "bench-528m": TinyShape(
        hidden_size=1024, num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, intermediate_size=2816, moe_intermediate_size=192,
        n_routed_experts=64, num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, use_qk_norm=True, vocab_size=32000, max_position_embeddings=4096,
        num_nextn_predict_layers=0),
    # GLM-4.5-Air's structure scaled down: no QK-norm, 1 dense layer of 6, scaling 1.0, top-4 of 32 routed experts
    # plus 1 shared, q width = hidden (12 heads x 64), 2 KV heads. 104.8M params, 44.1M read per decode token.
    "air-100m": TinyShape(
        hidden_size=768, num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=12,
        num_key_value_heads=2, head_dim=64, intermediate_size=2048, moe_intermediate_size=112,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, use_qk_norm=False, vocab_size=32000, max_position_embeddings=4096,
        num_nextn_predict_layers=0),
}
CHECKPOINT_SEED = 0


def prepare_checkpoint(model: str, cache_dir: Path, max_position_embeddings: int | None = None) -> Path:
    """A named shape is written once into cache_dir/NAME (rewritten when the shape changed); a path is used as is.
    max_position_embeddings raises a named shape's (for long contexts), in its own directory NAME-posN."""
    if model not in SHAPES:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"glmserve bench offline: {model!r} is neither a named shape ({', '.join(SHAPES)}) nor "
                             f"a checkpoint directory with a config.json")
        return path
    shape = SHAPES[model]
    if max_position_embeddings:
        shape = replace(shape, max_position_embeddings=max_position_embeddings)
        model = f"{model}-pos{max_position_embeddings}"
    directory = cache_dir / model
    stamp = directory / "bench_shape.json"
    wanted = {"shape": asdict(shape), "seed": CHECKPOINT_SEED}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (directory / "model.safetensors").is_file():
        return directory
    print(f"writing random checkpoint {model} to {directory} ...", flush=True)
    write_random_checkpoint(directory, shape, seed=CHECKPOINT_SEED, config_style="5")
    stamp.write_text(json.dumps(wanted, indent=2))
    return directory


def plain_token_ids(directory: Path) -> list[int]:
    """Token ids a random prompt may use: the tokenizer's, below the model's vocab_size, without its added
    (special and markup) tokens."""
    from glmserve.serving.tokenizer import Tokenizer

    tokenizer = Tokenizer(directory)
    vocab_size = json.loads((directory / "config.json").read_text())["vocab_size"]
    return [i for i in range(min(tokenizer.vocab_size, vocab_size)) if i not in tokenizer.added_token_ids]
