"""Token-level stop conditions (vLLM's rules). Stop strings are text and live in the serving layer."""

from __future__ import annotations

from glmserve.types import Request, RequestStatus


def check_stop(request: Request, new_token_id: int) -> RequestStatus | None:
    """Whether the request ends with new_token_id, which must already be appended to request.token_ids.

    Returns the finished status (the caller sets request.status) or None, and sets request.stop_reason to the
    stop token id for a stop_token_ids hit. A stop token stays in token_ids; the serving layer hides its text.
    A stop token is checked before the length caps, so an EOS sampled as the last allowed token reads "stop".
    """
    params = request.sampling_params
    # min_tokens suppresses stop tokens only; the length caps still apply (min_tokens <= max_tokens).
    if request.num_output_tokens >= params.min_tokens:
        if new_token_id in request.eos_token_ids and not params.ignore_eos:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if new_token_id in params.stop_token_ids:
            request.stop_reason = new_token_id
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.max_model_len is not None and request.num_tokens >= request.max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
