"""RejectionSampler: greedy prefix acceptance, and the sampled rule's exactness shown statistically, with a broken
rule shown to fail the same test."""

import pytest
import torch

from glmserve.engine import rejection_sampler
from glmserve.engine.rejection_sampler import RejectionSampler
from glmserve.engine.sampler import Sampler, SamplingBatch
from glmserve.types import Request, SamplingParams

CPU = torch.device("cpu")


def layout(num_drafts: list[int]) -> tuple[torch.Tensor, list[int]]:
    """row_index [B, K + 1] for requests with these draft counts, and each request's first row."""
    width = 1 + max(num_drafts)
    rows, firsts, next_row = [], [], 0
    for m in num_drafts:
        firsts.append(next_row)
        rows.append([next_row + j if j <= m else -1 for j in range(width)])
        next_row += m + 1
    return torch.tensor(rows), firsts


def verify(sampler, logits, requests_and_drafts):
    """requests_and_drafts: [(request, drafts)]; returns each request's emitted tokens."""
    requests, prefixes, draft_ids = [], [], []
    for request, drafts in requests_and_drafts:
        for j in range(len(drafts) + 1):
            requests.append(request)
            prefixes.append(drafts[:j])
            draft_ids.append(drafts[j] if j < len(drafts) else -1)
    row_index, firsts = layout([len(d) for _, d in requests_and_drafts])
    batch = SamplingBatch.build(requests, logits.shape[1], CPU, draft_prefixes=prefixes)
    out = RejectionSampler(sampler)(logits, batch, torch.tensor(draft_ids), row_index)
    tokens = out.token_ids.tolist()
    return [tokens[f : f + n] for f, n in zip(firsts, out.num_emitted.tolist())]


def request(rid="r", **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=None, **params))


def test_greedy_accepts_the_matching_prefix_then_the_argmax():
    logits = torch.randn(9, 20, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    wrong = lambda t: (t + 1) % 20  # noqa: E731
    cases = [
        (request("all", temperature=0.0), best[0:3]),  # rows 0-3: all accepted, then the bonus row's argmax
        (request("mid", temperature=0.0), [best[4], wrong(best[5])]),  # rows 4-6: one accepted, then a fix
        (request("none", temperature=0.0), [wrong(best[7])]),  # rows 7-8
    ]
    assert verify(Sampler(), logits, cases) == [best[0:4], best[4:6], [best[7]]]


def test_greedy_verification_sees_penalties_on_earlier_drafts():
    """Row j is processed as if drafts[:j] were already output: a frequency penalty on draft 0 changes row 1."""
    logits = torch.zeros(2, 5)
    logits[:, 2] = 1.0
    logits[:, 3] = 0.9
    r = request(temperature=0.0, frequency_penalty=0.5)
    assert verify(Sampler(), logits, [(r, [2])]) == [[2, 3]]  # row 1 prefers 3 once 2 is penalised


def test_min_tokens_holds_stop_ids_back_through_the_drafts():
    logits = torch.zeros(3, 6)
    logits[:, 0] = 5.0  # EOS, most likely everywhere
    r = Request("r", [1, 2], SamplingParams(max_tokens=None, temperature=0.0, min_tokens=2),
                eos_token_ids=frozenset({0}))
    # Rows 0 and 1 fall under min_tokens (0 and 1 outputs so far), row 2 does not.
    assert verify(Sampler(), logits, [(r, [1, 1])]) == [[1, 1, 0]]


# ---- exactness of the sampled rule ------------------------------------------------------------------------

VOCAB = 6
N = 50_000


def first_token_distance(seed: int) -> float:
    """Total-variation distance between the first emitted token and the target distribution, over N requests
    that each verify one draft (the target's second most likely token, so both branches are common)."""
    torch.manual_seed(seed)
    target = torch.tensor([1.6, 1.1, 0.7, 0.2, -0.4, -1.0])
    p = torch.softmax(target, -1)
    draft = int(p.argsort(descending=True)[1])
    requests = [request(f"r{i}", temperature=1.0) for i in range(N)]
    logits = target.repeat(2 * N, 1)
    batch = SamplingBatch.build([r for r in requests for _ in range(2)], VOCAB, CPU,
                                draft_prefixes=[p for _ in requests for p in ([], [draft])])
    draft_ids = torch.tensor([draft, -1]).repeat(N)
    row_index = torch.arange(2 * N).view(N, 2)
    out = RejectionSampler(Sampler())(logits, batch, draft_ids, row_index)
    first = out.token_ids[0::2]
    assert 0.2 < (out.num_emitted == 2).float().mean() < 0.4  # acceptance near p(draft)
    counts = torch.bincount(first, minlength=VOCAB).double()
    return float((counts / N - p.double()).abs().sum() / 2)


def test_sampled_tokens_follow_the_target_distribution():
    # With 50k draws over 6 tokens the sampling noise in TV distance is about 0.003; the broken rule gives 0.18.
    assert first_token_distance(0) < 0.01


def test_a_wrong_residual_fails_the_same_test(monkeypatch):
    """The classic bug: on rejection, resample from p itself instead of p without the draft."""
    monkeypatch.setattr(rejection_sampler, "residual_distribution", lambda probs, drafts, is_draft: probs)
    assert first_token_distance(0) > 0.05


def test_seeded_requests_reproduce_whatever_the_batch():
    logits = torch.randn(7, 30, generator=torch.Generator().manual_seed(3))
    alone = verify(Sampler(), logits[:3], [(request("s", temperature=0.8, seed=7), [4, 5])])
    mixed = verify(Sampler(), logits[[4, 5, 0, 1, 2, 6]], [
        (request("a", temperature=1.0), [9]),
        (request("s", temperature=0.8, seed=7), [4, 5]),
        (request("g", temperature=0.0), []),
    ])
    assert mixed[1] == alone[0]


@pytest.mark.parametrize("seed", [1, 2])
def test_no_drafts_draws_exactly_what_the_plain_sampler_draws(seed):
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(seed))
    requests = [request(f"r{i}", temperature=0.9, top_k=10, seed=100 + i) for i in range(4)]
    plain = Sampler()(logits, SamplingBatch.build(requests, 40, CPU)).token_ids.tolist()
    assert verify(Sampler(), logits, [(r, []) for r in requests]) == [[t] for t in plain]
