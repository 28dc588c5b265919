"""fp32 weights on the native kernels: a model's logits equal those of the torch path (the extension switched off,
as GLMSERVE_KERNELS=torch does) on GLM-4.5- and Air-shaped random checkpoints, in a prefill and in decodes of one
and of three sequences, and the native kernels are what ran."""

import pytest
import torch
from test_logits import _forward, _runner

from glmserve import kernels
from glmserve.kernels import native

# Both paths compute in fp32 and differ only in summation order: 1e-4 is the bound the logits tests hold glmserve
# to against transformers, ~1e-4 of the logits' spread on these checkpoints.
TOLERANCE = 1e-4


def _steps(runner, config_vocab: int) -> list[torch.Tensor]:
    """A batched prefill of 5, 23 and 40 tokens, then two decodes of all three sequences and one of the first."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config_vocab, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    tables = [[3, 0, 2, 1], [7, 5, 4, 6], [11, 9, 10, 8]]
    outs = [_forward(runner, [(p, 0, t) for p, t in zip(prompts, tables)])]
    lengths = [len(p) for p in prompts]
    for active in (3, 3, 1):
        nxt = torch.randint(0, config_vocab, (active,), generator=gen).tolist()
        outs.append(_forward(runner, [([nxt[i]], lengths[i], tables[i]) for i in range(active)]))
        for i in range(active):
            lengths[i] += 1
    return outs


@pytest.mark.parametrize("shape", ["glm45", "air"])
def test_native_fp32_logits_equal_the_torch_path(shape, checkpoints, monkeypatch):
    if native.extension() is None:
        pytest.skip("no native extension here")
    directory = checkpoints(shape)
    calls = {"moe_experts": 0, "linear": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    runner = _runner(directory)
    ours = _steps(runner, runner.model.config.vocab_size)
    assert calls["moe_experts"] > 0 and calls["linear"] > 0  # the native kernels ran the experts and the linears
    with monkeypatch.context() as torch_only:
        torch_only.setattr(native, "extension", lambda: None)
        calls.update(moe_experts=0, linear=0)
        reference_runner = _runner(directory)
        reference = _steps(reference_runner, reference_runner.model.config.vocab_size)
        assert calls == {"moe_experts": 0, "linear": 0}
    for a, b in zip(ours, reference):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOLERANCE
