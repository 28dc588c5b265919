"""MTP speculative decoding through the engine: greedy outputs token-identical to plain decoding (real MTP drafts
and oracle drafts that are mostly accepted), stops inside accepted runs, sampled outputs distributed as without
speculation, no KV leak with aborts, flags and errors."""

import itertools
import json
import random
from dataclasses import replace

import pytest
import torch

from glmserve import LLM, SamplingParams
from glmserve.config import ConfigError, EngineConfig
from glmserve.engine import rejection_sampler
from glmserve.engine.llm_engine import LLMEngine
from glmserve.layers.attention import DenseBatch
from glmserve.models import EMBEDDED_MODEL
from glmserve.testing.checkpoint import GLM45, config_dict, random_tensors, save_tensors

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths; half of them share a 40-token prefix (prefix-cache hits in the second wave)."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 1000) for _ in range(40)]
    prompts = []
    for i, n in enumerate([3, 70, 12, 33, 8, 51, 19, 26]):
        own = [rng.randrange(1, 1000) for _ in range(n)]
        prompts.append(shared + own if i % 2 else own)
    return prompts


_request_ids = itertools.count()


def _run(engine: LLMEngine, prompts, params, abort_every: int = 0) -> dict[tuple, list[int]]:
    """Outputs by prompt; with abort_every, the oldest running request is aborted every that many steps."""
    ids = {}
    for prompt in prompts:
        rid = str(next(_request_ids))
        engine.add_request(rid, prompt, params)
        ids[rid] = tuple(prompt)
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        if abort_every and steps % abort_every == 0:
            running = [r.request_id for r in engine.scheduler.running]
            engine.abort(running[:1])
        for out in engine.step():
            if out.request_id in outputs:  # not requests another caller queued
                outputs[out.request_id].extend(out.new_token_ids)
    return {ids[rid]: tokens for rid, tokens in outputs.items()}


def _engine(checkpoint, k: int, **overrides) -> LLMEngine:
    args = dict(num_kv_blocks=96, max_num_batched_tokens=48, long_prefill_token_threshold=20)
    return LLMEngine(EngineConfig(model=str(checkpoint), num_speculative_tokens=k, **{**args, **overrides}),
                     progress=False)


def _use_oracle_drafts(engine: LLMEngine, expected: dict[tuple, list[int]], wrong_every: int = 5) -> None:
    """Replace the MTP's drafts by the known greedy continuation, every `wrong_every`-th draft corrupted, so most
    are accepted and some rejected mid-run. The MTP layer still runs (its KV is still written)."""
    runner = engine.runner
    propose = runner._propose
    numbered = itertools.count(1)

    def oracle(chunks, sampled, last_known, hidden, *target):
        drafts = propose(chunks, sampled, last_known, hidden, *target)
        for i, (chunk, new) in enumerate(zip(chunks, sampled)):
            if not drafts[i]:
                continue
            done = len(chunk.request.output_token_ids) + len(new)
            truth = expected[tuple(chunk.request.prompt_token_ids)][done : done + len(drafts[i])]
            truth += [7] * (len(drafts[i]) - len(truth))
            for j in range(len(truth)):
                if next(numbered) % wrong_every == 0:
                    truth[j] = (truth[j] + 1) % 1000
            drafts[i] = truth
        return drafts

    runner._propose = oracle


@pytest.fixture(scope="module")
def glm45(checkpoints):
    return checkpoints("glm45")


@pytest.fixture(scope="module")
def expected(glm45):
    """Plain greedy outputs of _prompts(), no drafts."""
    return _run(_engine(glm45, 0), _prompts(), GREEDY)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identical_with_mtp_drafts(glm45, expected, k):
    engine = _engine(glm45, k)
    assert _run(engine, _prompts(), GREEDY) == expected
    assert _run(engine, _prompts(), GREEDY) == expected  # second wave: prefix-cache hits
    assert engine.kv_cache.prefix_cache_hits >= 4 * 32
    spec = engine.scheduler.stats().spec_decoding
    assert spec.num_drafts > 100 and spec.num_draft_tokens > (k - 0.5) * spec.num_drafts  # capped at the end


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identical_with_mostly_accepted_drafts(glm45, expected, k):
    engine = _engine(glm45, k)
    _use_oracle_drafts(engine, expected)
    assert _run(engine, _prompts(), GREEDY) == expected
    assert _run(engine, _prompts(), GREEDY) == expected
    spec = engine.scheduler.stats().spec_decoding
    assert spec.num_accepted_tokens > 0.5 * spec.num_draft_tokens
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    # Fewer steps than tokens: 2 * 8 requests x 24 tokens in far fewer verification runs.
    assert spec.mean_acceptance_length > 1.5


def _dense_mtp_drafts(model, context: list[int], k: int) -> list[int]:
    """The reference chain without a KV cache: the target over context[:-1], the MTP layer over (h[i],
    context[i + 1]), then each draft appended as a row fed the MTP's own last output, re-run causally."""
    mtp, batch = model.mtp_layer, DenseBatch(1)
    with torch.inference_mode():
        hidden = model(torch.tensor(context[:-1]), torch.arange(len(context) - 1), batch)
        rows, tokens, drafts = list(hidden), context[1:], []
        for _ in range(k):
            out = mtp(torch.arange(len(rows)), torch.tensor(tokens), torch.stack(rows), batch)
            drafts.append(int(mtp.compute_logits(out[-1:]).argmax()))
            rows.append(out[-1])
            tokens = tokens + drafts[-1:]
    return drafts


def test_drafts_equal_a_dense_mtp_chain(glm45, expected):
    """The engine's MTP drafts (chunked prefills, runs of accepted and rejected drafts, placeholder tokens on
    rejected rows, lookahead slots) equal the chain computed without a cache from the same tokens."""
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (5, 61, 17, 40)]  # no shared prefixes
    want = _run(_engine(glm45, 0), prompts, GREEDY)
    engine = _engine(glm45, 3)
    recorded = []
    propose = engine.runner._propose

    def record(chunks, sampled, last_known, hidden, *target):
        drafts = propose(chunks, sampled, last_known, hidden, *target)
        for chunk, new, made in zip(chunks, sampled, drafts):
            if made:
                recorded.append((chunk.request.prompt_token_ids + chunk.request.output_token_ids + new, made))
        return drafts

    engine.runner._propose = record
    _use_oracle_drafts(engine, want, wrong_every=4)
    assert _run(engine, prompts, GREEDY) == want
    spec = engine.scheduler.stats().spec_decoding
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens  # both kinds of rows were exercised
    assert len(recorded) > 20
    model = engine.runner.model
    for context, drafts in recorded[::3]:
        assert drafts == _dense_mtp_drafts(model, context, 3), len(context)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=None),
    SamplingParams(temperature=0.0, max_tokens=20, min_tokens=9, ignore_eos=True),
], ids=["max_tokens", "stop_token", "min_tokens"])  # fmt: skip
def test_stops_inside_accepted_runs(glm45, params):
    prompts = _prompts(1)
    plain = _run(_engine(glm45, 0), prompts, replace(params, ignore_eos=True, stop_token_ids=[]))
    # Stop on a token that the plain run emits mid-output; with min_tokens, one it emits early (held back).
    stops = [tokens[3 if params.min_tokens == 0 else 2] for tokens in plain.values()]
    params = replace(params, stop_token_ids=stops)
    want = _run(_engine(glm45, 0), prompts, params)
    engine = _engine(glm45, 3)
    _use_oracle_drafts(engine, want, wrong_every=11)
    assert _run(engine, prompts, params) == want
    if params.min_tokens:
        assert all(len(t) >= 9 for t in want.values())


def test_aborts_and_many_requests_leak_no_blocks(glm45, expected):
    engine = _engine(glm45, 3, num_kv_blocks=40)  # small pool: preemptions too
    _use_oracle_drafts(engine, expected)
    for wave in range(3):
        _run(engine, _prompts(), GREEDY, abort_every=3 + wave)
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


# ---- sampled outputs ------------------------------------------------------------------------------------------


def test_seeded_requests_reproduce_alone_and_in_a_batch(glm45):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = _prompts()[1]
    alone = _run(_engine(glm45, 2), [prompt], seeded)[tuple(prompt)]
    engine = _engine(glm45, 2)
    others = [p for p in _prompts(2) if p != prompt]
    for p in others:  # unseeded neighbours, queued first so the seeded request joins a running batch
        engine.add_request(f"other-{len(p)}", p, SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
    engine.step()
    assert _run(engine, [prompt], seeded)[tuple(prompt)] == alone

SMALL_VOCAB = 12


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A weights-and-config-only checkpoint (the engine needs no tokenizer) with a 12-token vocabulary."""
    shape = replace(GLM45, vocab_size=SMALL_VOCAB, num_hidden_layers=3, first_k_dense_replace=1)
    directory = tmp_path_factory.mktemp("small-vocab")
    (directory / "config.json").write_text(json.dumps(config_dict(shape, [0], 0)))
    tensors = random_tensors(shape, seed=5)
    tensors["lm_head.weight"] *= 6  # sharper than a random head, so drafts of the mode are often accepted
    save_tensors(tensors, directory)
    return directory


def _histograms(checkpoint, k: int, num_requests: int, mode_drafts: list[int] | None = None):
    """[3, vocab] counts of the 1st, 2nd and 3rd sampled tokens over requests seeded 0..n-1."""
    engine = _engine(checkpoint, k, num_kv_blocks=2 * num_requests, max_num_seqs=num_requests,
                     max_num_batched_tokens=4 * num_requests)
    if mode_drafts is not None:  # always draft the most common token at each position: accepted often
        propose = engine.runner._propose

        def mode(chunks, sampled, last_known, hidden, *target):
            drafts = propose(chunks, sampled, last_known, hidden, *target)
            for i, (chunk, new) in enumerate(zip(chunks, sampled)):
                done = len(chunk.request.output_token_ids) + len(new)
                if drafts[i]:
                    drafts[i] = (mode_drafts[done:] + [1] * k)[:k]
            return drafts

        engine.runner._propose = mode
    outputs: dict[str, list[int]] = {}
    for i in range(num_requests):
        outputs[str(i)] = []
        engine.add_request(str(i), [3, 1, 4, 1, 5], SamplingParams(temperature=1.0, seed=i, max_tokens=3,
                                                                   ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    counts = torch.zeros(3, SMALL_VOCAB)
    for tokens in outputs.values():
        for position, token in enumerate(tokens):
            counts[position, token] += 1
    return counts, engine.scheduler.stats().spec_decoding


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest total-variation distance over the three positions."""
    return float(((a / a.sum(1, keepdim=True) - b / b.sum(1, keepdim=True)).abs().sum(1) / 2).max())


N_SAMPLED = 1500


@pytest.fixture(scope="module")
def plain_histograms(small_vocab):
    return _histograms(small_vocab, 0, N_SAMPLED)[0]


def test_sampled_tokens_distributed_as_without_speculation(small_vocab, plain_histograms):
    modes = plain_histograms.argmax(1).tolist()
    counts, spec = _histograms(small_vocab, 2, N_SAMPLED, modes)
    assert 0.25 < spec.num_accepted_tokens / spec.num_draft_tokens < 0.9
    assert _tv(counts, plain_histograms) < TV_THRESHOLD


def test_a_wrong_acceptance_rule_is_caught(small_vocab, plain_histograms, monkeypatch):
    monkeypatch.setattr(rejection_sampler, "residual_distribution", lambda probs, drafts, is_draft: probs)
    counts, _ = _histograms(small_vocab, 2, N_SAMPLED, plain_histograms.argmax(1).tolist())
    assert _tv(counts, plain_histograms) > TV_THRESHOLD


# Two independent samples of 1500 over 12 tokens differ by about 0.03 in TV; the wrong rule moves the mode's
# probability by p(1 - p) of the rejections, far more.
TV_THRESHOLD = 0.07


# ---- configuration ---------------------------------------------------------------------------------------------


def test_speculative_config_like_vllm(glm45, expected):
    llm = LLM(glm45, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, num_kv_blocks=96)
    prompts = _prompts()[:3]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [expected[tuple(p)] for p in prompts]
    assert llm.engine.config.num_speculative_tokens == 2


@pytest.mark.parametrize("config,message", [
    ({"method": "ngram"}, "method 'ngram' is not supported"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "must be a positive integer"),
    ({"method": "mtp", "prompt_lookup_max": 3}, "unsupported keys"),
])  # fmt: skip
def test_bad_speculative_config(glm45, config, message):
    with pytest.raises(ConfigError, match=message):
        LLM(glm45, speculative_config=config)


def test_checkpoint_without_mtp_layer_is_refused(checkpoints):
    no_mtp = checkpoints("no-mtp", shape=replace(GLM45, num_nextn_predict_layers=0))
    with pytest.raises(ConfigError, match="has none"):
        LLM(no_mtp, speculative_config={"method": "mtp", "num_speculative_tokens": 1})


# ---- the embedded model: a real MTP layer, real acceptance ----------------------------------------------------


@pytest.fixture(scope="module")
def embedded_prompts():
    """The last turns of eight held-out conversations of the embedded model's corpus, rendered and tokenized:
    prompts of mixed lengths (arithmetic, tool calls, tool results, chat)."""
    from glmserve.nano.corpus import conversations
    from glmserve.serving.tokenizer import Tokenizer

    tokenizer = Tokenizer(EMBEDDED_MODEL)
    stream = conversations(3, "heldout")
    return [tokenizer.encode(next(stream)[-1].prompt) for _ in range(8)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_embedded_model_greedy_identical(embedded_prompts, k):
    params = SamplingParams(temperature=0.0, max_tokens=80)
    args = dict(num_kv_blocks=256, max_num_batched_tokens=256, long_prefill_token_threshold=96)
    want = _run(_engine(EMBEDDED_MODEL, 0, **args), embedded_prompts, params)
    engine = _engine(EMBEDDED_MODEL, k, **args)
    assert _run(engine, embedded_prompts, params) == want
    assert _run(engine, embedded_prompts, params) == want  # again, from the prefix cache
    assert engine.kv_cache.prefix_cache_hits > 0
    spec = engine.scheduler.stats().spec_decoding
    assert spec.mean_acceptance_length > 1.2  # a trained MTP layer: drafts are accepted


def test_logprobs_of_accepted_drafts_match_plain_decoding(glm45, expected):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[:3]]
    plain = LLM(glm45, num_kv_blocks=96).generate(prompts, params)
    llm = LLM(glm45, num_kv_blocks=96, num_speculative_tokens=3)
    _use_oracle_drafts(llm.engine, expected)
    spec = llm.generate(prompts, params)
    assert llm.engine.scheduler.stats().spec_decoding.num_accepted_tokens > 10
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert (x.token_id, x.rank, [t for t, _ in x.top]) == (y.token_id, y.rank, [t for t, _ in y.top])
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
