"""Token-level stop rules: EOS, stop_token_ids, min_tokens, max_tokens, max_model_len."""

from glmserve.engine.stop import check_stop
from glmserve.types import Request, RequestStatus, SamplingParams

EOS = 2


def make_request(max_model_len=None, **params) -> Request:
    sampling = SamplingParams(**params)
    return Request("r", [10, 11, 12], sampling, eos_token_ids=frozenset({EOS}), max_model_len=max_model_len)


def feed(request: Request, tokens: list[int]) -> RequestStatus | None:
    """Append tokens one by one as the scheduler does; the status of the first stop, or None."""
    for token_id in tokens:
        request.append_output_token(token_id)
        status = check_stop(request, token_id)
        if status is not None:
            return status
    return None


def test_no_stop():
    request = make_request(max_tokens=10)
    assert feed(request, [5, 6, 7]) is None
    assert request.stop_reason is None


def test_eos_stops_and_is_kept():
    request = make_request(max_tokens=10)
    assert feed(request, [5, EOS, 6]) is RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [5, EOS]
    assert request.stop_reason is None


def test_ignore_eos():
    request = make_request(max_tokens=4, ignore_eos=True)
    assert feed(request, [EOS, EOS, EOS]) is None
    assert feed(request, [EOS]) is RequestStatus.FINISHED_LENGTH


def test_stop_token_ids_sets_stop_reason():
    request = make_request(max_tokens=10, stop_token_ids=[7, 8])
    assert feed(request, [5, 8]) is RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 8
    assert request.output_token_ids == [5, 8]


def test_stop_token_ids_apply_with_ignore_eos():
    request = make_request(max_tokens=10, ignore_eos=True, stop_token_ids=[7])
    assert feed(request, [EOS, 7]) is RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 7


def test_min_tokens_suppresses_eos_and_stop_ids():
    request = make_request(max_tokens=10, min_tokens=3, stop_token_ids=[7])
    assert feed(request, [EOS, 7]) is None  # outputs 1 and 2 are below min_tokens
    assert feed(request, [EOS]) is RequestStatus.FINISHED_STOPPED  # the third output may stop


def test_min_tokens_does_not_suppress_length():
    request = make_request(max_tokens=2, min_tokens=2)
    assert feed(request, [5, 6]) is RequestStatus.FINISHED_LENGTH


def test_max_tokens():
    request = make_request(max_tokens=3)
    assert feed(request, [5, 6]) is None
    assert feed(request, [7]) is RequestStatus.FINISHED_LENGTH
    assert request.stop_reason is None


def test_max_tokens_none_is_unbounded_without_max_model_len():
    request = make_request(max_tokens=None)
    assert feed(request, [5] * 100) is None


def test_max_model_len():
    request = make_request(max_model_len=5, max_tokens=None)
    assert feed(request, [5]) is None  # 4 tokens
    assert feed(request, [6]) is RequestStatus.FINISHED_LENGTH  # 5 tokens


def test_stop_token_on_last_allowed_token_reads_stop():
    request = make_request(max_tokens=2)
    assert feed(request, [5, EOS]) is RequestStatus.FINISHED_STOPPED
