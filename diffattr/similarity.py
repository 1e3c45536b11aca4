"""Look-alike baselines: pixel ℓ2 and CLIP cosine similarity. Pure tensor functions.

They answer "which training images look like the query?", not "which made it": the gap between
the two is what attribution is for, so diffattr reports them beside its own scores.
"""

from __future__ import annotations

import torch


def pixel_similarity(queries: torch.Tensor, train: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    """Negative mean squared pixel distance: ``(Q, C, H, W), (N, C, H, W) → (Q, N)``, higher = closer.

    Streams over the training set in chunks of ``batch_size`` images.
    """
    q = queries.flatten(1).double()
    chunks = []
    for start in range(0, len(train), batch_size):
        x = train[start : start + batch_size].flatten(1).double()
        squared = q.pow(2).sum(1, keepdim=True) - 2 * q @ x.T + x.pow(2).sum(1)
        chunks.append((-squared.clamp_min(0) / q.shape[1]).float())
    return torch.cat(chunks, dim=1)
