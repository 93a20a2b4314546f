"""Perplexity: exp of the mean over windows of the model's next-token loss on each window
(GPTQ protocol; windows come from `quant.data.eval_windows`)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def window_losses(model, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = True, desc: str = "perplexity") -> list[float]:
    """Mean next-token loss of each window [n, seqlen], computed `batch_size` windows at a time."""
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch",
                          disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            losses += loss.view(len(batch), -1).mean(dim=1).tolist()
    return losses


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> float:
    losses = window_losses(model, windows, batch_size, progress, desc)
    return math.exp(sum(losses) / len(losses))
