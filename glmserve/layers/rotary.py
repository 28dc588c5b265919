import torch
from torch import nn

from glmserve import kernels


class PartialRotaryEmbedding(nn.Module):
    """NeoX-style (rotate_half) RoPE on the first `rotary_dim` dims of each head; the rest pass through.

    Tables are widened to the whole head so one rotation is `x * cos + partner(x) * signed_sin`, where partner(x)
    swaps the two halves of the rotary dims (kernels/reference.py's qk_norm_rope_reference): the pass-through dims
    get cos 1 and sin 0, and rotate_half's sign is folded into the sin table. The angles are computed once with the
    same fp32 arithmetic transformers uses per forward, so the tables are bit-identical to its.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, theta: float):
        super().__init__()
        half = rotary_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = torch.ones(max_positions, head_dim)
        sin = torch.zeros(max_positions, head_dim)
        cos[:, :rotary_dim] = emb.cos()
        sin[:, :half] = -emb.sin()[:, :half]
        sin[:, half:rotary_dim] = emb.sin()[:, half:]
        self.half, self.rotary_dim = half, rotary_dim
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows [T, D] for the positions of this step."""
        return self.cos.index_select(0, positions).to(dtype), self.sin.index_select(0, positions).to(dtype)

    def qk_norm_rope(self, rope: tuple[torch.Tensor, torch.Tensor], qkv: torch.Tensor, q_weight: torch.Tensor | None,
                     k_weight: torch.Tensor | None, num_q_heads: int, num_kv_heads: int,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) heads of the QKV projection's rows [T, (Hq + 2 Hkv) D], q and k RMS-normalized per head (when
        the weights are given) and rotated: one native call on fp32 rows (kernels.qk_norm_rope)."""
        cos, sin = rope
        return kernels.qk_norm_rope(qkv, cos, sin, q_weight, k_weight, num_q_heads, num_kv_heads, self.cos.shape[1],
                                    self.rotary_dim, eps)
