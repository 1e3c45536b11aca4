"""The candidate pre-filter (``--candidates M``): score only the training images nearest the query.

A query's Forward-INF pass costs N·K forward rows; most training images are far from the query and
score near zero. The pre-filter ranks the training images by the RMS distance between their
encodings (the model's own space: pixels, or VAE latents — already cached in the run directory, so
the retriever costs no extra pass) and the query's, and keeps the M nearest plus every image within
``duplicate_radius`` of the M-th distance. By the triangle inequality that margin keeps every near
duplicate (RMS distance ≤ ``duplicate_radius``) of the M nearest images: a copy of one of them is
never dropped, whatever M.

``--retriever loss`` adds the images the query's perturbed copy moves most: one pass over the
training set at a single grid timestep (:func:`retrieval_column`; N rows instead of N·K), scored by
the run's aggregation on that column, its top M joining the M nearest. The perturbation's signal finds
the influences that are not pixel neighbours (a style, a concept); the encodings' distance keeps the
near-duplicate guarantee. A query then costs N + (≤ 2M)·K rows.

Exact search, one shard of encodings at a time (memory: N distances): it costs one subtraction per
encoding value, far below one UNet forward per candidate, so an approximate index would not change
the per-query cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .shards import row_chunks

# RMS difference (in the model's space; pixels in [-1, 1]) up to which two images are near duplicates:
# the audit's copy tolerance.
DUPLICATE_RADIUS = 0.02


class Prefilter(NamedTuple):
    """``--candidates M`` with its ``--retriever``."""

    count: int
    retriever: str = "l2"

    @property
    def suffix(self) -> str:
        """What the query's folder name carries, so that each pre-filter keeps its own results."""
        return f"-candidates{self.count}" + ("" if self.retriever == "l2" else f"-{self.retriever}")


def retrieval_column(num_timesteps: int) -> int:
    """The grid column ``--retriever loss`` scores every image at: the one nearest the first quartile
    of the noise levels (t ≈ T/4 on the default grid; of t ≈ T/4, T/2 and 3T/4, it kept the most of
    the full pass's top-10 on the customization protocol, in a one-off comparison on the bundled toy)."""
    return round((num_timesteps - 1) / 4)


def rms_distances(query: torch.Tensor, encodings) -> torch.Tensor:
    """``(N,)`` RMS distance between ``query`` ``(C, H, W)`` and every encoding ``(N, C, H, W)``."""
    flat = query.detach().flatten().float().cpu()
    parts = [(chunk.flatten(1).float() - flat).pow(2).mean(1).sqrt() for chunk in row_chunks(encodings, 1024)]
    return torch.cat(parts)


def candidate_rows(
    query: torch.Tensor, encodings, count: int, *, duplicate_radius: float = DUPLICATE_RADIUS
) -> torch.Tensor:
    """Indices (ascending) of the training images a query's pass scores under ``--candidates count``.

    Args:
        query: ``(C, H, W)`` the query in the model's space.
        encodings: ``(N, C, H, W)`` training encodings (a tensor or a sharded one).
        count: M, the nearest images to keep (``≥ N``: all of them).
        duplicate_radius: the margin past the M-th distance (see the module docstring).
    """
    distances = rms_distances(query, encodings)
    if count >= len(distances):
        return torch.arange(len(distances))
    cutoff = distances.kthvalue(count).values + duplicate_radius
    return torch.nonzero(distances <= cutoff).flatten()
