"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m3edge.errors import M3Error


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style: divide positive logits, multiply negative)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise M3Error(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise M3Error(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise M3Error(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise M3Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise M3Error(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def sample(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator | None) -> int:
    """logits [V] -> one token id."""
    logits = logits.float().clone()
    if p.repetition_penalty != 1.0 and history:
        ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
        ids = ids[ids < logits.shape[0]]
        prev = logits[ids]
        logits[ids] = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = logits.topk(p.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
