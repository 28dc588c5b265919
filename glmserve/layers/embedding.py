"""The vocabulary embedding, its table held by a QuantMethod (float, or int8 rows under the quantized methods)."""

from __future__ import annotations

import torch
from torch import nn

from glmserve.layers.quantization import QuantMethod, UnquantizedMethod


class VocabEmbedding(nn.Module):
    """Replicated on every rank; the checkpoint tensor is `<prefix>.weight` [vocab, hidden], as nn.Embedding's."""

    def __init__(self, vocab_size: int, hidden: int, quant_method: QuantMethod | None = None):
        super().__init__()
        self.vocab_size, self.hidden = vocab_size, hidden
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_embedding(self, vocab_size, hidden)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if tuple(loaded.shape) != (self.vocab_size, self.hidden):
            raise ValueError(f"shape mismatch: expected {(self.vocab_size, self.hidden)}, "
                             f"checkpoint has {tuple(loaded.shape)}")
        self.quant_method.load_rows(self, "weight", None, 0, loaded)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.embed(self, ids)
