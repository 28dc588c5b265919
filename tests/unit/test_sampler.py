"""Sampler: greedy, seeds, min-p/top-k/top-p masks, penalties, min_tokens, temperature and logprobs, checked against
plain per-row Python references on small vocabularies."""

import math

import pytest
import torch

from glmserve.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_sampling_masks,
    argmax_rows,
    plain_argmax,
)
from glmserve.types import Request, SamplingParams

CPU = torch.device("cpu")


def make_request(rid="r", prompt=(1, 2, 3), output=(), eos=(), **params) -> Request:
    request = Request(rid, list(prompt), SamplingParams(max_tokens=None, **params), eos_token_ids=frozenset(eos))
    for t in output:
        request.append_output_token(t)
    return request


def sample(sampler, logits, requests):
    return sampler(logits, SamplingBatch.build(requests, logits.shape[1], CPU))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# --- greedy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    requests = [make_request(f"r{i}", temperature=0.0, seed=i) for i in range(6)]
    out = sample(Sampler(), logits, requests)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    requests = [make_request("g0", temperature=0.0), make_request("s", top_k=5), make_request("g1", temperature=0.0)]
    requests.append(make_request("s2", temperature=2.0, seed=3))
    tokens = sample(Sampler(), logits, requests).token_ids
    assert tokens[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()


def test_all_greedy_batch_never_draws(monkeypatch):
    def no_draw(*args, **kwargs):
        raise AssertionError("an all-greedy batch drew random numbers")

    monkeypatch.setattr(torch.Tensor, "exponential_", no_draw)
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    plain = [make_request(f"r{i}", temperature=0.0, seed=i, top_k=3, top_p=0.5, min_p=0.2) for i in range(3)]
    edited = [
        make_request("a", temperature=0.0, seed=1, repetition_penalty=1.5, output=(4,)),
        make_request("b", temperature=0.0, eos=(7,), min_tokens=2),
        make_request("c", temperature=0.0, frequency_penalty=1.0),
    ]
    sampler = Sampler()
    rng_state = torch.get_rng_state()
    for requests in (plain, edited):
        batch = SamplingBatch.build(requests, 20, CPU)
        assert batch.temperature is batch.top_k is batch.top_p is batch.min_p is None
        assert batch.seeds == [None, None, None]
        sampler(logits, batch)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert not sampler._generators


# --- seeds ----------------------------------------------------------------------------------------------------


def run_steps(sampler, rows_and_requests, steps=8):
    """Samples the same batch `steps` times; returns each step's tokens."""
    logits = torch.stack([row for row, _ in rows_and_requests])
    requests = [r for _, r in rows_and_requests]
    return [sample(sampler, logits, requests).token_ids.tolist() for _ in range(steps)]


PLAIN = dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, seed=4, stop_token_ids=[7])  # none of these matter
NOT_PLAIN = [
    dict(temperature=0.7),
    dict(temperature=0.0, logprobs=0),
    dict(temperature=0.0, presence_penalty=0.5),
    dict(temperature=0.0, frequency_penalty=-0.5),
    dict(temperature=0.0, repetition_penalty=1.2),
    dict(temperature=0.0, min_tokens=3, eos=(5,)),  # 2 output tokens below: min_tokens still masks the stop ids
]


@pytest.mark.parametrize("params", NOT_PLAIN)
def test_plain_argmax_only_where_the_sampler_would_take_the_argmax_of_raw_logits(params):
    """The runner skips the SamplingBatch where plain_argmax says so; it must agree with the batch's own view."""
    params = dict(params)
    eos = params.pop("eos", ())
    plain = [make_request(f"p{i}", output=(1, 2), **PLAIN) for i in range(2)]
    other = make_request("x", output=(1, 2), eos=eos, **params)

    def takes_raw_argmax(requests):
        batch = SamplingBatch.build(requests, 50, CPU)
        return batch.temperature is None and not batch.edits_logits and batch.max_num_logprobs is None

    assert plain_argmax(plain) and takes_raw_argmax(plain)
    assert not plain_argmax(plain + [other]) and not takes_raw_argmax(plain + [other])
    reached = make_request("m", output=(1, 2, 3), eos=(5,), temperature=0.0, min_tokens=3)
    assert plain_argmax([reached]) and takes_raw_argmax([reached])


def test_same_seed_same_tokens_whatever_the_batch():
    g = torch.Generator().manual_seed(3)
    row, other = torch.randn(100, generator=g) * 0.3, torch.randn(100, generator=g)
    alone = [t[0] for t in run_steps(Sampler(), [(row, make_request("a", seed=42, top_p=0.95))])]
    mixed = run_steps(
        Sampler(),
        [
            (other, make_request("x", temperature=0.7)),
            (other, make_request("y", seed=7)),
            (row, make_request("a", seed=42, top_p=0.95)),
            (other, make_request("z", temperature=0.0)),
        ],
    )
    assert [t[2] for t in mixed] == alone
    assert len(set(alone)) > 1  # the generator advances across steps
    other_seed = [t[0] for t in run_steps(Sampler(), [(row, make_request("a", seed=43, top_p=0.95))])]
    assert other_seed != alone


def test_remove_forgets_the_generator():
    row = torch.zeros(1, 100)
    sampler = Sampler()
    first = [sample(sampler, row, [make_request("a", seed=5)]).token_ids.item() for _ in range(4)]
    sampler.remove("a")
    again = [sample(sampler, row, [make_request("a", seed=5)]).token_ids.item() for _ in range(4)]
    assert first == again


# --- masks ----------------------------------------------------------------------------------------------------


def reference_masks(logits: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Which tokens survive min-p, then top-k, then top-p: a plain per-row reference in float64."""
    kept = list(range(len(logits)))

    def probs_of(ids):
        m = max(logits[i] for i in ids)
        weights = {i: math.exp(logits[i] - m) for i in ids}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    p = probs_of(kept)
    kept = [i for i in kept if p[i] >= min_p * max(p.values())]
    if top_k:
        kept = sorted(kept, key=lambda i: -logits[i])[:top_k]
    p = probs_of(kept)
    survivors, mass = [], 0.0
    for i in sorted(kept, key=lambda i: -p[i]):
        if mass >= top_p:
            break
        survivors.append(i)
        mass += p[i]
    return [i in survivors for i in range(len(logits))]


@pytest.mark.parametrize("features", ["top_k", "top_p", "min_p", "top_k+top_p", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_masks_match_reference(features, seed):
    g = torch.Generator().manual_seed(seed)
    vocab, rows = 24, 16
    logits = torch.randn(rows, vocab, generator=g) * 2
    choice = lambda options: options[torch.randint(len(options), (1,), generator=g).item()]  # noqa: E731
    requests = []
    for i in range(rows):
        params = {}
        if "top_k" in features or features == "all":
            params["top_k"] = choice([0, 1, 2, 5, 11, 30])
        if "top_p" in features or features == "all":
            params["top_p"] = choice([1.0, 0.9, 0.5, 0.2, 0.01])
        if "min_p" in features or features == "all":
            params["min_p"] = choice([0.0, 0.05, 0.3, 1.0])
        requests.append(make_request(f"r{i}", **params))
    batch = SamplingBatch.build(requests, vocab, CPU)
    masked = apply_sampling_masks(logits.clone(), batch)
    for row, request in zip(range(rows), requests):
        sp = request.sampling_params
        expected = reference_masks(logits[row].tolist(), sp.top_k, sp.top_p, sp.min_p)
        assert torch.isfinite(masked[row]).tolist() == expected, (row, sp)
        kept = torch.isfinite(masked[row])
        assert torch.equal(masked[row][kept], logits[row][kept])  # survivors keep their values


# --- penalties ------------------------------------------------------------------------------------------------


def reference_penalties(logits: list[float], prompt, output, presence, frequency, repetition) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(4)
    vocab = 12
    settings = [
        dict(presence_penalty=0.5, prompt=(1, 1, 2), output=(3, 3, 3, 4)),
        dict(frequency_penalty=0.7, prompt=(5,), output=(5, 6, 6)),
        dict(repetition_penalty=1.8, prompt=(0, 7, 7, 8), output=(9,)),
        dict(repetition_penalty=0.6, presence_penalty=-1.0, frequency_penalty=-0.3, prompt=(2,), output=(2, 11, 11)),
        dict(presence_penalty=2.0, frequency_penalty=1.0, repetition_penalty=1.3, prompt=(4, 5, 6), output=()),
        dict(temperature=0.0, prompt=(1,), output=(1, 2)),  # neutral row in a penalised batch
    ]
    requests = [make_request(f"r{i}", **s) for i, s in enumerate(settings)]
    logits = torch.randn(len(requests), vocab, generator=g) * 3
    batch = SamplingBatch.build(requests, vocab, CPU)
    got = apply_penalties(logits.clone(), batch)
    for row, (r, s) in enumerate(zip(requests, settings)):
        sp = r.sampling_params
        args = (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty)
        expected = reference_penalties(logits[row].tolist(), list(s["prompt"]), list(s["output"]), *args)
        assert got[row].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_penalty_changes_the_greedy_choice_and_leaves_caller_logits_alone():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0]])
    original = logits.clone()
    request = make_request(temperature=0.0, prompt=(0,), output=(1,), repetition_penalty=1.2)
    assert sample(Sampler(), logits, [request]).token_ids.tolist() == [2]
    assert torch.equal(logits, original)


def test_no_penalty_no_token_tensors():
    batch = SamplingBatch.build([make_request(output=(1, 2))], 10, CPU)
    assert batch.output_token_ids is None and batch.prompt_token_ids is None
    batch = SamplingBatch.build([make_request(frequency_penalty=0.1, output=(1, 2)), make_request()], 10, CPU)
    assert batch.prompt_token_ids is None  # only repetition looks at the prompt
    assert batch.output_token_ids.tolist() == [[1, 2], [10, 10]]


# --- min_tokens -----------------------------------------------------------------------------------------------


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 0.0]]).repeat(4, 1)
    requests = [
        make_request("short", eos=(2,), stop_token_ids=[3], min_tokens=2, output=(0,), temperature=0.0),
        make_request("done", eos=(2,), stop_token_ids=[3], min_tokens=2, output=(0, 0), temperature=0.0),
        make_request("ignore_eos", eos=(2,), stop_token_ids=[1], min_tokens=2, ignore_eos=True, temperature=0.0),
        make_request("sampled", eos=(2, 3), min_tokens=1, top_k=1),
    ]
    assert sample(Sampler(), logits, requests).token_ids.tolist() == [1, 2, 2, 1]


# --- temperature ----------------------------------------------------------------------------------------------

CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


def test_sampled_distribution_matches_softmax_over_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    n, temperature = 40_000, 0.6
    requests = [make_request(f"r{i}", temperature=temperature) for i in range(n)]
    tokens = sample(Sampler(), logits.repeat(n, 1), requests).token_ids
    counts = torch.bincount(tokens, minlength=6)
    assert chi_square(counts, torch.softmax(logits / temperature, -1)) < CHI2_DF5_P001
    # The check has teeth: the same draws are far from the distribution without temperature.
    assert chi_square(counts, torch.softmax(logits, -1)) > 100 * CHI2_DF5_P001


def test_seeded_draws_follow_the_masked_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 0.1]])
    request = make_request(seed=11, temperature=1.5, top_k=6)
    sampler, batch = Sampler(), SamplingBatch.build([request], 8, CPU)
    tokens = torch.cat([sampler(logits, batch).token_ids for _ in range(3000)])
    counts = torch.bincount(tokens, minlength=8)
    assert counts[[3, 5]].sum() == 0  # outside the top 6
    kept = [0, 1, 2, 4, 6, 7]
    assert chi_square(counts[kept], torch.softmax(logits[0, kept] / 1.5, -1)) < CHI2_DF5_P001


# --- logprobs -------------------------------------------------------------------------------------------------


def test_logprobs_are_raw_with_ranks_and_top_n():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    best = logits[0].argmax().item()
    requests = [
        make_request("masked", eos=(best,), min_tokens=1, temperature=0.0, logprobs=2),  # samples the runner-up
        make_request("none", temperature=0.0),
        make_request("zero", temperature=0.8, logprobs=0),
    ]
    out = sample(Sampler(), logits, requests)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp, token = out.logprobs[row], out.token_ids[row].item()
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[row, token].item())
        assert lp.rank == raw[row].argsort(descending=True).tolist().index(token) + 1
    assert out.logprobs[0].rank == 2
    order = raw[0].argsort(descending=True)[:2].tolist()
    assert [t for t, _ in out.logprobs[0].top] == order
    assert [v for _, v in out.logprobs[0].top] == pytest.approx(raw[0, order].tolist())
    assert out.logprobs[2].top == []


@pytest.mark.parametrize("vocab", [2048, 4096, 32000, 32001, 151552])
def test_argmax_rows_equals_torch_argmax(vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=gen)
    top = x.max() + 1
    x[0, [7, vocab - 3]] = top  # a tie across blocks: the first index wins
    x[1, [300, 301]] = top  # a tie inside one block
    x[2] = float("-inf")  # every token masked
    x[3, vocab // 2] = float("nan")
    x[4, [vocab - 1, 0]] = top  # the maximum at both ends
    x[5] = x[5].to(torch.bfloat16).float()  # rounded logits: more ties
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    strided = x.t().contiguous().t()  # the same values, not row-contiguous
    assert torch.equal(argmax_rows(strided), x.argmax(dim=-1))
