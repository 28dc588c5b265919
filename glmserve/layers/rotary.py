import torch
from torch import nn


class PartialRotaryEmbedding(nn.Module):
    """NeoX-style (rotate_half) RoPE on the first `rotary_dim` dims of each head; the rest pass through.

    Tables are widened to the whole head so one rotation is `x * cos + partner(x) * signed_sin`, where partner(x)
    swaps the two halves of the rotary dims: the pass-through dims get cos 1 and sin 0, and rotate_half's sign is
    folded into the sin table. The angles are computed once with the same fp32 arithmetic transformers uses per
    forward, so the tables are bit-identical to its.
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
        """(cos, sin) rows for the positions of this step, shaped [T, 1, D] to broadcast over heads."""
        return (self.cos.index_select(0, positions).unsqueeze(1).to(dtype),
                self.sin.index_select(0, positions).unsqueeze(1).to(dtype))

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] → rotated copy."""
        cos, sin = rope
        # One cat of views (4-7x faster than gathering with an index tensor for prefill-sized x).
        partner = torch.cat([x[..., self.half : self.rotary_dim], x[..., : self.half], x[..., self.rotary_dim :]], -1)
        return torch.addcmul(x * cos, partner, sin)
