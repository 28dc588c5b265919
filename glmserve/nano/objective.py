"""The training objective: next-token loss on completion tokens, plus the MTP layer's next-next-token loss.

MTP follows vLLM's and SGLang's inference semantics: at position i the MTP layer reads
eh_proj([enorm(embed(token[i+1])), hnorm(h[i])]), where h[i] is the main model's last hidden state before the
final norm, and predicts token[i+2]. Logits are computed only where there is a loss (a quarter of the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmserve.layers.attention import DenseBatch
from glmserve.layers.moe import TopkRouter
from glmserve.model.glm4_moe import Glm4MoeForCausalLM
from glmserve.nano.data import Batch


@dataclass
class Losses:
    main: torch.Tensor
    mtp: torch.Tensor
    main_correct: int  # greedy next-token hits on target tokens
    mtp_correct: int  # greedy next-next-token hits
    main_count: int
    mtp_count: int
    mtp_agree: int  # MTP's greedy guess equals the main model's greedy guess for the same token

    def total(self, mtp_weight: float) -> torch.Tensor:
        return self.main + mtp_weight * self.mtp


def _loss(logits: torch.Tensor, labels: torch.Tensor, emphasis: torch.Tensor,
          name_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy, with tokens marked by `emphasis` counting `name_weight` times; and the greedy guesses."""
    guesses = logits.detach().argmax(-1)
    if name_weight == 1.0:
        return F.cross_entropy(logits, labels), guesses
    weights = 1.0 + (name_weight - 1.0) * emphasis.float()
    return (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum(), guesses


def next_token_loss(model: Glm4MoeForCausalLM, batch: Batch, name_weight: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The main model's loss on `batch` (h[i] predicts token[i+1], on target tokens only): (hidden states [B, S, H],
    loss, greedy guesses, labels). Fine-tuning (glmserve.finetune) trains on this loss alone."""
    ids, target = batch.ids, batch.target
    b, s = ids.shape
    hidden = model(ids.flatten(), torch.arange(s).repeat(b), DenseBatch(b)).view(b, s, -1)
    keep = target[:, 1:]
    labels = ids[:, 1:][keep]
    loss, guesses = _loss(model.compute_logits(hidden[:, :-1][keep]), labels, batch.emphasis[:, 1:][keep],
                          name_weight)
    return hidden, loss, guesses, labels


def compute_losses(model: Glm4MoeForCausalLM, batch: Batch, name_weight: float = 1.0) -> Losses:
    """The losses on `batch`; `name_weight` > 1 weighs the tokens of called tools' names more (the one choice a
    tool-call turn makes: which listed tool fits the request), for the main and the MTP loss alike."""
    ids, target, emphasis = batch.ids, batch.target, batch.emphasis
    b, s = ids.shape
    # Main model. Guesses are kept per predicted token to compare with the MTP's.
    hidden, main, main_guess, labels = next_token_loss(model, batch, name_weight)
    keep = target[:, 1:]
    main_guesses = torch.full_like(ids, -1)
    main_guesses[:, 1:][keep] = main_guess

    # MTP: (token[i+1], h[i]) at position i predicts token[i+2]; rows are one token shorter.
    mtp = model.mtp_layer
    mtp_positions = torch.arange(s - 1).repeat(b)
    mtp_hidden = mtp(mtp_positions, ids[:, 1:].flatten(), hidden[:, :-1].flatten(0, 1), DenseBatch(b))
    keep2 = target[:, 2:]
    labels2 = ids[:, 2:][keep2]
    mtp_logits = mtp.compute_logits(mtp_hidden.view(b, s - 1, -1)[:, :-1][keep2])
    mtp_loss, mtp_guess = _loss(mtp_logits, labels2, emphasis[:, 2:][keep2], name_weight)
    return Losses(main, mtp_loss, int((main_guess == labels).sum()), int((mtp_guess == labels2).sum()),
                  len(labels), len(labels2), int((main_guesses[:, 2:][keep2] == mtp_guess).sum()))


class LoadBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step, raise the correction bias of experts that
    got fewer tokens than average and lower it for the others, by a fixed `rate`. The bias only steers selection."""

    def __init__(self, model: Glm4MoeForCausalLM, rate: float = 1e-3):
        self.rate = rate
        self.counts: dict[TopkRouter, torch.Tensor] = {}
        self.routers = [m for m in model.modules() if isinstance(m, TopkRouter)]
        for router in self.routers:
            router.register_forward_hook(self._record)

    def _record(self, router: TopkRouter, inputs, output) -> None:
        _, ids = output
        counts = torch.bincount(ids.flatten(), minlength=router.weight.shape[0])
        self.counts[router] = self.counts.get(router, 0) + counts

    def step(self) -> float:
        """Update the biases from the tokens routed since the last call; returns the worst load imbalance
        (max expert load / mean load) over the layers."""
        worst = 1.0
        with torch.no_grad():
            for router, counts in self.counts.items():
                load = counts.float()
                router.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
                worst = max(worst, float(load.max() / load.mean().clamp(min=1)))
        self.counts.clear()
        return worst
