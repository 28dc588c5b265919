"""End-to-end greedy generation through the engine (scheduler, paged KV cache, sampler) against transformers."""

import pytest
import torch

from glmserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _generate(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def air(checkpoints):
    return checkpoints("air")


def test_batched_greedy_equals_transformers_generate(air, hf_model, monkeypatch):
    prompts = _prompts(1024, [3, 9, 17, 30, 44, 61, 5, 26])
    ours = _generate(LLM(air, num_kv_blocks=64), prompts)
    hf = hf_model("air")
    # Like ignore_eos: no EOS at all (min_new_tokens would instead mask EOS logits and change the argmax).
    monkeypatch.setattr(hf.generation_config, "eos_token_id", None)
    for prompt, tokens in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


def test_batch_invariance_alone_batched_chunked_and_prefix_cached(air):
    prompts = _prompts(1024, [37, 5, 70, 12, 33, 8, 51, 19, 26, 64, 3, 45, 29, 15, 58, 40])
    target = prompts[0]
    alone = _generate(LLM(air, num_kv_blocks=128), [target])[0]

    batched = _generate(LLM(air, num_kv_blocks=128), prompts)[0]
    chunked_llm = LLM(air, num_kv_blocks=128, max_num_batched_tokens=24, long_prefill_token_threshold=5)
    chunked = _generate(chunked_llm, prompts)[0]
    # The same LLM again: the target's prompt is now in the prefix cache.
    cached_out = chunked_llm.generate([{"prompt_token_ids": target}], GREEDY)[0]
    assert cached_out.num_cached_tokens >= 32
    assert alone == batched == chunked == cached_out.outputs[0].token_ids


def test_preemption_when_the_pool_is_too_small(air):
    prompts = _prompts(1024, [30, 20, 45, 10, 33, 27], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = _generate(LLM(air, num_kv_blocks=128), prompts, params)
    small = LLM(air, num_kv_blocks=12, max_model_len=12 * 16)  # room for ~2 of the 6 sequences at once
    scheduler = small.engine.scheduler
    preempted: list[str] = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(out.preempted_request_ids)
        return out

    scheduler.schedule = recording_schedule
    got = _generate(small, prompts, params)
    assert preempted, "the pool was meant to be too small for all requests at once"
    assert got == expected
    assert small.engine.kv_cache.num_free_blocks == 12


def test_same_seed_same_tokens(air):
    llm = LLM(air, num_kv_blocks=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    prompts = _prompts(1024, [10, 20])
    first = _generate(llm, prompts, params)
    again = _generate(llm, [prompts[1], prompts[0]], params)
    assert first == [again[1], again[0]]
    other = _generate(llm, prompts, SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True))
    assert other != first
