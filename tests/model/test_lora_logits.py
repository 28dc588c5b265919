"""Logits with LoRA adapters against transformers' Glm4MoeForCausalLM with the adapter's deltas merged into its
weights (and against peft's PeftModel where peft applies the adapter), fp32, within 1e-4."""

import pytest
import torch
import transformers

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import AttentionMetadata
from glmserve.layers.lora import batch as lora_batch
from glmserve.testing.checkpoint import SHAPES
from glmserve.testing.lora import merge_into, write_random_adapter
from glmserve.types import LoRARequest, Request, SamplingParams, ScheduledChunk

transformers.logging.set_verbosity_error()


def _runner(directory, max_loras=2, max_lora_rank=16) -> ModelRunner:
    config = EngineConfig(model=str(directory), num_kv_blocks=32, enable_lora=True, max_loras=max_loras,
                          max_lora_rank=max_lora_rank)
    return ModelRunner(ModelConfig.from_pretrained(directory), config, progress=False)


def _logits(runner: ModelRunner, seqs: list[tuple[list[int], LoRARequest | None]]) -> list[torch.Tensor]:
    """Prefill all sequences in one step, each with its adapter; the logits of every token, per sequence."""
    chunks = [ScheduledChunk(Request(str(i), ids, SamplingParams(lora_request=lora)), ids, 0, True)
              for i, (ids, lora) in enumerate(seqs)]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(seqs))]
    meta = AttentionMetadata.build([0] * len(seqs), [len(ids) for ids, _ in seqs], tables, runner.block_size,
                                   runner.device, runner.attn_backend)
    meta.lora = runner.lora.prepare(chunks)
    ids = torch.tensor([t for s, _ in seqs for t in s])
    pos = torch.tensor([p for s, _ in seqs for p in range(len(s))])
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(ids, pos, meta))
    return list(logits.split([len(s) for s, _ in seqs]))


def _reference(directory, deltas=None) -> transformers.Glm4MoeForCausalLM:
    model = transformers.Glm4MoeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    if deltas is not None:
        merge_into(model, deltas)
    return model


CASES = [  # shape, rank, targets, layout, rsLoRA, rows_path
    ("glm45", 8, ("attn",), "per_expert", False, "grouped"),
    ("glm45", 4, ("attn", "mlp", "experts"), "per_expert", True, "masked"),
    ("air", 16, ("mlp", "experts"), "fused", False, "grouped"),
    ("air", 2, ("attn", "mlp"), "per_expert", False, "masked"),
]


@pytest.mark.parametrize("shape,rank,targets,layout,rslora,rows_path", CASES)
def test_adapter_logits_match_merged_transformers(shape, rank, targets, layout, rslora, rows_path, checkpoints,
                                                  tmp_path, monkeypatch):
    """Two adapters and the base model in one batch: each sequence's logits equal transformers' with that
    adapter merged (the base sequence: the plain model). rows_path: the linear layers' per-slot matmuls
    (sgmv-like) or every slot at once, masked per row (bgmv-like), whatever the step's size."""
    monkeypatch.setattr(lora_batch, "MASKED_MAX_ROWS", 0 if rows_path == "grouped" else 10**6)
    directory = checkpoints(shape)
    tiny = SHAPES[shape]
    deltas = [write_random_adapter(tmp_path / f"a{i}", tiny, rank, targets, layout, use_rslora=rslora, seed=i)
              for i in range(2)]
    runner = _runner(directory)
    loras = [LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")) for i in range(2)]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, tiny.vocab_size, (n,), generator=gen).tolist() for n in (9, 14, 6, 11)]
    ours = _logits(runner, [(prompts[0], loras[0]), (prompts[1], None), (prompts[2], loras[1]),
                            (prompts[3], loras[0])])
    refs = [_reference(directory, deltas[0]), _reference(directory), _reference(directory, deltas[1]),
            _reference(directory, deltas[0])]
    with torch.inference_mode():
        for got, ref, prompt in zip(ours, refs, prompts):
            expected = ref(torch.tensor([prompt])).logits[0]
            assert (got - expected).abs().max().item() <= 1e-4
    # The adapters change the logits visibly (the comparison above would not miss a dropped delta).
    with torch.inference_mode():
        plain = refs[1](torch.tensor([prompts[0]])).logits[0]
    assert (ours[0] - plain).abs().max().item() > 1e-2


def test_peft_model_logits(checkpoints, tmp_path):
    """An adapter that peft itself made and saved (random, nonzero B) serves the logits PeftModel computes. With
    transformers 5, peft 0.21 puts LoRA on the attention and on the routed experts' fused tensors only (its
    qwen2_moe mapping leaves the dense MLP and the shared experts without it), so those are what it checks."""
    peft = pytest.importorskip("peft")
    directory = checkpoints("air")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = peft.get_peft_model(_reference(directory), config).eval()
    model.save_pretrained(tmp_path / "peft")
    runner = _runner(directory)
    prompt = torch.randint(0, SHAPES["air"].vocab_size, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = _logits(runner, [(prompt, LoRARequest("p", 1, str(tmp_path / "peft")))])[0]
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0]
        plain = _reference(directory)(torch.tensor([prompt])).logits[0]
    assert (ours - expected).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-2
