"""The kernel tests run every code path this CPU has: each ISA of the native extension (built once per session by
the first test that asks for it, then cached on disk) and the torch fallback ("torch")."""

import pytest

from glmserve.kernels import native


def kernel_paths() -> list[str]:
    return ["torch", *native.available_isas()]


@pytest.fixture(params=kernel_paths())
def isa(request, monkeypatch) -> str | None:
    """The path a test runs on; "torch" runs the public functions with the extension switched off."""
    if request.param == "torch":
        monkeypatch.setattr(native, "extension", lambda: None)
        return None
    return request.param
