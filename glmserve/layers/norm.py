import torch
import torch.nn.functional as F
from torch import nn

from glmserve import kernels


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in fp32 and cast back, without a weight."""
    if x.dtype == torch.float32:  # the fused kernel; the same arithmetic when nothing is cast
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back, then scales: the order transformers' Glm4MoeRMSNorm uses.

    Given the residual stream as well (as vLLM's layers carry it), it adds x to it first and returns (normalized,
    new residual): on fp32 rows both in one native call (kernels.rms_norm_residual)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            if x.dtype == torch.float32:
                return kernels.rms_norm(x, self.weight, self.eps)
            return self.weight * rms_normalize(x, self.eps)
        if x.dtype == residual.dtype == torch.float32:
            return kernels.rms_norm_residual(x, residual, self.weight, self.eps)
        hidden = x + residual
        return self(hidden), hidden
