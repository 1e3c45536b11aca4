"""Memorization signals, as pure tensor functions: loss gap, nearest neighbours, replicas, mislabels.

Shapes: N training images, K grid timesteps, D = C·H·W values per encoding, Q query rows (generated
samples, test images, or the training images themselves). Distances are ℓ2 between encodings
(pixels in ``[-1, 1]``). Every score reads *higher = more suspicious*.

Nearest neighbours are computed in chunks of queries × keys, keeping a running top-k, so no
``(Q, N)`` matrix is ever held: the memory is ``chunk_size²`` distances plus the ``(Q, k)`` result.
Queries and keys are *row sources*: tensors, or the run directory's sharded encodings
(:class:`~diffattr.shards.ShardedTensor`), read one chunk of rows at a time — so the memory does
not grow with the training set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

_EPS = 1e-12


# -- nearest neighbours, streamed -------------------------------------------------------------------


@dataclass
class Neighbours:
    """The nearest keys of each query row.

    Attributes:
        distances: ``(Q, k)`` ℓ2 distances, ascending; ``inf`` where fewer than k keys qualify.
        indices: ``(Q, k)`` key indices, ``-1`` where fewer than k keys qualify.
        num_copies: ``(Q,)`` keys within ``copy_distance`` of the query (left out of ``indices``).
        copies: ``(Q, m)`` the nearest of those copies, ``-1`` padded (``m = max_copies``).
    """

    distances: torch.Tensor
    indices: torch.Tensor
    num_copies: torch.Tensor
    copies: torch.Tensor


def _merge_smallest(
    distances: torch.Tensor, indices: torch.Tensor, new_distances: torch.Tensor, new_indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if k == 0:
        return distances, indices
    both = torch.cat([distances, new_distances], 1)
    both_indices = torch.cat([indices, new_indices.expand(len(both), -1)], 1)
    # A stable sort keeps the lower key index first among equal distances, whatever the chunking.
    order = torch.sort(both, dim=1, stable=True).indices[:, :k]
    return both.gather(1, order), both_indices.gather(1, order)


def _rows_per_chunk(chunk_size: int, dim: int) -> int:
    """Caps a chunk at about 2**24 values, so that large images do not make huge blocks."""
    return max(1, min(chunk_size, 2**24 // max(dim, 1)))


def _row_dim(source) -> int:
    """D, the values per row of a row source (a tensor or a sharded one)."""
    return math.prod(source.shape[1:])


def _rows(source, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a row source, flattened to ``(stop − start, D)`` floats."""
    return source[start:stop].flatten(1).float()


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ℓ2 distances ``(A, B)``, in float64: identical rows come out at 0, not at float32 rounding."""
    return torch.cdist(a.double(), b.double()).float()


def nearest_neighbours(
    queries,
    keys,
    *,
    k: int,
    copy_distance: float | None = None,
    max_copies: int = 0,
    skip_self: bool = False,
    chunk_size: int = 1024,
    progress: bool = False,
    description: str = "neighbours",
) -> Neighbours:
    """The k nearest keys of every query, in ℓ2, computed chunk by chunk.

    Args:
        queries: ``(Q, ...)`` rows (flattened to ``(Q, D)``): a tensor or a sharded one.
        keys: ``(N, ...)`` rows (flattened to ``(N, D)``): a tensor or a sharded one.
        k: neighbours per query.
        copy_distance: keys at most this far from a query are its *copies*: counted in
            ``num_copies`` and left out of the k neighbours (``None``: no key is a copy).
        max_copies: how many copy indices to keep per query (nearest first).
        skip_self: ``queries`` are ``keys`` (row i is key i): a row is never its own neighbour or copy.
        chunk_size: rows per block on each side; the memory is ``chunk_size²`` distances.
        progress: show a progress bar.
        description: its label.

    Returns:
        :class:`Neighbours`.
    """
    if skip_self and len(queries) != len(keys):
        raise ValueError("skip_self needs queries and keys to be the same rows")
    num_queries, num_keys = len(queries), len(keys)
    chunk_size = _rows_per_chunk(chunk_size, _row_dim(queries))
    inf = torch.tensor(float("inf"))
    distances = torch.full((num_queries, k), inf)
    indices = torch.full((num_queries, k), -1, dtype=torch.long)
    copy_distances = torch.full((num_queries, max_copies), inf)
    copies = torch.full((num_queries, max_copies), -1, dtype=torch.long)
    num_copies = torch.zeros(num_queries, dtype=torch.long)
    num_blocks = math.ceil(num_queries / chunk_size) * math.ceil(num_keys / chunk_size)
    with tqdm(total=num_blocks, disable=not progress, desc=description, unit="block") as bar:
        for q in range(0, num_queries, chunk_size):
            rows, query_rows = slice(q, q + chunk_size), _rows(queries, q, q + chunk_size)
            for s in range(0, num_keys, chunk_size):
                block = _distances(query_rows, _rows(keys, s, s + chunk_size))
                key_index = torch.arange(s, min(s + chunk_size, num_keys))[None]
                if skip_self:
                    block[torch.arange(q, min(q + chunk_size, num_queries))[:, None] == key_index] = inf
                is_copy = (
                    block <= copy_distance if copy_distance is not None else torch.zeros_like(block, dtype=torch.bool)
                )
                num_copies[rows] += is_copy.sum(1)
                copy_distances[rows], copies[rows] = _merge_smallest(
                    copy_distances[rows], copies[rows], block.masked_fill(~is_copy, inf), key_index, max_copies
                )
                distances[rows], indices[rows] = _merge_smallest(
                    distances[rows], indices[rows], block.masked_fill(is_copy, inf), key_index, k
                )
                bar.update()
    indices[distances.isinf()] = -1
    copies[copy_distances.isinf()] = -1
    return Neighbours(distances, indices, num_copies, copies)


def within_distance(query: torch.Tensor, keys, distance: float, *, chunk_size: int = 4096) -> torch.Tensor:
    """Indices of all keys at most ``distance`` from one query row, ascending. ``(...), (N, ...) → (M,)``."""
    query = query.flatten().float()[None]
    chunk_size = _rows_per_chunk(chunk_size, _row_dim(keys))
    found = [
        start + torch.nonzero(_distances(query, _rows(keys, start, start + chunk_size))[0] <= distance).flatten()
        for start in range(0, len(keys), chunk_size)
    ]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


# -- replication (Carlini et al. 2023) --------------------------------------------------------------


def reference_distance(distances: torch.Tensor) -> torch.Tensor:
    """Mean distance of each image to its neighbours, ignoring the ``inf`` padding. ``(N, n) → (N,)``.

    An image with no neighbour at all (every other image is a copy of it) gets 0: nothing can be
    closer than that, so nothing is called a replica of it on distance alone.
    """
    finite = distances.isfinite()
    total = distances.masked_fill(~finite, 0).sum(1)
    count = finite.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def carlini_ratio(distance: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """ℓ2(gen, x) / mean ℓ2 of x to its n nearest training neighbours; ``inf`` where the reference is 0."""
    return torch.where(reference > 0, distance / reference.clamp_min(_EPS), torch.full_like(distance, float("inf")))


def is_replica(distance: torch.Tensor, reference: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Carlini et al.'s criterion: ``ℓ2(gen, x) < α · reference(x)`` with x the nearest training image.

    Args:
        distance: ``(G,)`` distance of each sample to its nearest training image x.
        reference: ``(G,)`` mean distance of that x to its n nearest (distinct) training neighbours.
        alpha: the factor α (0.5 in the paper).

    Returns:
        ``(G,)`` booleans.
    """
    return distance < alpha * reference


# -- loss gap ---------------------------------------------------------------------------------------


def robust_zscore(values: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """``(median − x) / (1.4826 · MAD)`` per column, against a reference population. ``(N, K) → (N, K)``.

    Sign: *lower* values than the reference population score *higher*. The median and MAD resist the
    very outliers (memorized images) the score looks for.
    """
    reference = values if reference is None else reference
    median = reference.median(0).values
    spread = 1.4826 * (reference - median).abs().median(0).values
    return (median - values) / spread.clamp_min(_EPS)


def loss_gap(
    losses: torch.Tensor, *, reference: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far below its peers an image's denoising loss is, per timestep and averaged.

    Each timestep's log-loss is robust-z-scored against the same timestep's losses of the reference
    population (the training set), so every timestep counts equally whatever its scale, and a ratio
    of losses (not a difference) is what counts. Log: small-t losses span orders of magnitude.

    Args:
        losses: ``(N, K)`` baseline losses of the images to score.
        reference: ``(M, K)`` losses of the population to compare with (default: ``losses``).
        weights: ``(K,)`` weight of each timestep in the average (default: uniform).

    Returns:
        ``(N,)`` loss gap (higher = more memorized-looking) and the ``(N, K)`` per-timestep gaps.
    """
    reference = losses if reference is None else reference
    per_timestep = robust_zscore(losses.clamp_min(_EPS).log(), reference.clamp_min(_EPS).log())
    if weights is None:
        return per_timestep.mean(1), per_timestep
    weights = weights.to(per_timestep.dtype)
    return (per_timestep * weights).sum(1) / weights.sum().clamp_min(_EPS), per_timestep


def timestep_weights(timesteps: torch.Tensor, *, num_train_timesteps: int, max_fraction: float) -> torch.Tensor:
    """1 for grid timesteps below ``max_fraction · T``, else 0; at least the smallest one counts. ``(K,)``."""
    weights = (timesteps.double() < max_fraction * num_train_timesteps).double()
    if weights.sum() == 0:
        weights[timesteps.argmin()] = 1.0
    return weights


def combined_score(gap: torch.Tensor, replicas: torch.Tensor, *, replica_weight: float) -> torch.Tensor:
    """One memorization score: the loss gap plus ``replica_weight · log2(1 + replicas)``. ``(N,) → (N,)``.

    The loss gap is a robust z-score (ordinary images lie around 0, spread ≈ 1); each doubling of the
    replicas that name an image (or a copy of it) top-1 adds ``replica_weight`` to it.
    """
    return gap + replica_weight * torch.log2(1 + replicas.to(gap.dtype))


def ranking_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties by the lower index (stable). ``(N,) → (N,)``."""
    return torch.sort(scores, descending=True, stable=True).indices


# -- mislabeled data --------------------------------------------------------------------------------


def mislabel_scores(class_losses: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss under the image's own label minus the lowest loss under any other label.

    Args:
        class_losses: ``(N, C)`` loss of each image conditioned on each of the C labels (same noise).
        labels: ``(N,)`` each image's own label.

    Returns:
        ``(N,)`` scores (positive: another label explains the image better) and ``(N,)`` that best
        other label.
    """
    labels = labels.long()
    own = class_losses.gather(1, labels[:, None])[:, 0]
    others = class_losses.scatter(1, labels[:, None], float("inf"))
    best, best_label = others.min(1)
    return own - best, best_label


# -- metrics ----------------------------------------------------------------------------------------


def auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½.

    Args:
        scores: ``(N,)``, higher = predicted positive.
        positives: ``(N,)`` booleans.

    Computed from ranks (O(N log N)), not from an N_pos × N_neg matrix.
    """
    scores, positives = scores.double().flatten(), positives.bool().flatten()
    num_positive, num_negative = int(positives.sum()), int((~positives).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    order = torch.argsort(scores)
    # Tied scores share the mean of their ranks.
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[positives].sum().item()
    return (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


def tpr_at_fpr(scores: torch.Tensor, positives: torch.Tensor, fpr: float = 0.01) -> float:
    """The fraction of positives flagged by the strictest threshold that flags at most ``fpr`` of the
    negatives (a positive tied with the threshold is not flagged): the membership-inference
    literature's operating point. ``(N,), (N,) → float``."""
    scores, positives = scores.double().flatten(), positives.bool().flatten()
    negatives = torch.sort(scores[~positives], descending=True).values
    if positives.sum() == 0 or len(negatives) == 0:
        raise ValueError("TPR at an FPR needs at least one positive and one negative")
    allowed = int(fpr * len(negatives))  # negatives that may lie above the threshold
    if allowed >= len(negatives):
        return 1.0
    return (scores[positives] > negatives[allowed]).double().mean().item()


def precision_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Fraction of positives among the k highest scores (ties by the lower index)."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"k={k} must be between 1 and {len(scores)}")
    return positives.bool()[ranking_order(scores)[:k]].float().mean().item()
