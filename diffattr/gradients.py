"""Gradient baselines: TracIn and D-TRAK, from per-example gradients and a random projection.

Both methods featurise every image by the gradient of one scalar function of the model, averaged
over the run's timestep grid with the run's own noise (common random numbers), then projected to
``d`` dimensions with a seeded random matrix (Johnson–Lindenstrauss: inner products survive), made
block by block from its seed and never held whole past a memory budget (:class:`Projector`):

- **TracIn** (Pruthi et al. 2020, one checkpoint): ``f`` = the denoising loss;
  ``score(q, i) = φ_q · φ_i``.
- **D-TRAK** (Zheng et al. 2024): ``f`` = ``‖ε_θ(x_t, t)‖²`` (the "square" output function, their
  best); ``score(q, i) = φ_q (ΦᵀΦ + λI)⁻¹ φ_i`` with Φ the ``(N, d)`` training features.
  ``λ = damping × mean eigenvalue of ΦᵀΦ``; ``damping = inf`` is the plain projected dot product.

Costs N·K backward passes up front (cached per run directory, in shards); each query then needs K
backward passes and one ``(d,) × (d, N)`` product — cheap per query, expensive to start. The
training features are read a shard at a time (D-TRAK's ``ΦᵀΦ`` is summed over them), so memory is
flat in N.
"""

from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import tqdm

from . import distributed
from .config import GradientConfig
from .denoisers import Denoiser
from .errors import DiffattrError
from .losses import denoising_loss, gradients_of
from .noise import draw_noise, noise_key
from .perturb import select_parameters
from .shards import row_chunks

# The scalar each method differentiates: the denoising loss, or the squared norm of the output.
_FUNCTIONS = {"tracin": "loss", "dtrak": "square"}


# Projection blocks are kept in memory up to this many bytes (a 0.9M-parameter UNet at d = 1024);
# past it they are regenerated from their seeds on every call (the same values): memory stays flat
# in the number of parameters.
PROJECTION_CACHE_BYTES = 4 << 30
# Rows of flattened per-example gradients held at once, in bytes (at least one row).
GRADIENT_BUFFER_BYTES = 1 << 30


class Projector:
    """A seeded random projection ``(p,) → (d,)`` that preserves inner products in expectation,
    applied block by block over the parameter axis; block ``b`` comes from its own seed, so the
    values depend neither on the block size nor on whether a block was kept or regenerated.

    Kinds:
        ``gaussian``: a dense ``(p, d)`` matrix of N(0, 1/d) entries (TRAK's and D-TRAK's).
        ``sparse``: a CountSketch (sparse Johnson–Lindenstrauss with one non-zero per input
            coordinate): coordinate i adds ``±g_i`` to one of the d outputs. O(p) work and memory per
            gradient instead of O(p·d): what makes the baselines run on an SD-size UNet on a CPU.
    """

    KINDS = ("gaussian", "sparse")

    def __init__(
        self,
        num_params: int,
        dim: int,
        *,
        seed: int,
        device: torch.device,
        kind: str = "gaussian",
        chunk: int = 1 << 16,
        max_cached_bytes: int = PROJECTION_CACHE_BYTES,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"unknown projection {kind!r}; known: {self.KINDS}")
        self.num_params, self.dim, self.seed, self.device = num_params, dim, seed, device
        self.kind, self.chunk = kind, chunk
        bytes_per_row = 4 * dim if kind == "gaussian" else 9  # int64 bucket + int8 sign
        self.cached = num_params * bytes_per_row <= max_cached_bytes
        self._blocks = [self._block(start) for start in self._starts()] if self.cached else None

    def _starts(self) -> range:
        return range(0, self.num_params, self.chunk)

    def _block(self, start: int):
        rows = min(self.chunk, self.num_params - start)
        generator = torch.Generator().manual_seed(noise_key(self.seed, "projection", start))
        if self.kind == "gaussian":
            return (torch.randn(rows, self.dim, generator=generator) / math.sqrt(self.dim)).to(self.device)
        buckets = torch.randint(self.dim, (rows,), generator=generator)
        signs = torch.randint(2, (rows,), generator=generator, dtype=torch.int8) * 2 - 1
        return buckets.to(self.device), signs.to(self.device)

    def blocks(self):
        """``(start, block)`` pairs in order, kept or regenerated."""
        for index, start in enumerate(self._starts()):
            yield start, (self._blocks[index] if self.cached else self._block(start))

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(B, p)`` → ``(B, d)``."""
        out = torch.zeros(gradients.shape[0], self.dim, device=gradients.device)
        for start, block in self.blocks():
            if self.kind == "gaussian":
                out += gradients[:, start : start + block.shape[0]] @ block
            else:
                buckets, signs = block
                part = gradients[:, start : start + len(buckets)] * signs
                out.index_add_(1, buckets, part)
        return out


@functools.lru_cache(maxsize=1)
def _projector(num_params: int, dim: int, seed: int, device: torch.device, kind: str) -> Projector:
    """The last projection made, kept: queries reuse the training set's."""
    return Projector(num_params, dim, seed=seed, device=device, kind=kind)


def _scalar_function(
    model: Denoiser,
    clean: torch.Tensor,
    condition: torch.Tensor | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    function: str,
) -> torch.Tensor:
    """Mean over the K rows of one image of the loss or the squared output norm."""
    rows = clean.expand(len(timesteps), *clean.shape)
    conditions = None if condition is None else condition.expand(len(timesteps), *condition.shape)
    if function == "loss":
        return denoising_loss(model, rows, noise, timesteps, conditions).loss.mean()
    prediction = model.predict(model.add_noise(rows, noise, timesteps), timesteps, conditions)
    return prediction.float().pow(2).flatten(1).mean(1).mean()


def projected_gradients(
    model: Denoiser,
    images: torch.Tensor,
    conditions: torch.Tensor | None,
    names: list[str],
    *,
    method: str,
    timesteps: torch.Tensor,
    seed: int,
    config: GradientConfig,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "gradients",
) -> torch.Tensor:
    """Projected per-example gradients ``(N, d)`` of the method's function, averaged over the grid.

    Args:
        images: ``(N, C, H, W)`` encodings.
        conditions: ``(N, ...)`` conditions or ``None``.
        names: one name per image; with ``seed`` it fixes the image's noise (the run's CRN noise
            for training ids).
        method: ``tracin`` or ``dtrak``.
        timesteps: ``(K,)`` grid.
    """
    function = _FUNCTIONS[method]
    device = model.device
    params = [p for _, p in select_parameters(model, config.gradient_params, flag="--gradient-params")]
    num_params = sum(p.numel() for p in params)
    projector = _projector(num_params, config.projection_dim, seed, device, config.projection)
    grid = timesteps.to(device)
    mine = distributed.block(len(images))  # sharded: this process's rows, gathered below
    features = torch.empty(len(mine), config.projection_dim)
    batch_size = max(1, min(batch_size, len(images), GRADIENT_BUFFER_BYTES // (4 * num_params)))
    flat = torch.empty(batch_size, num_params, device=device)
    progress = progress and distributed.is_main()
    with gradients_of(params):
        for start in tqdm(range(0, len(mine), batch_size), disable=not progress, desc=description):
            stop = min(start + batch_size, len(mine))
            for row, i in enumerate(range(mine.start + start, mine.start + stop)):
                keys = [noise_key(seed, names[i], k, 0) for k in range(len(grid))]
                noise = draw_noise(keys, images.shape[1:]).to(device)
                condition = None if conditions is None else conditions[i].to(device)
                value = _scalar_function(model, images[i].to(device), condition, noise, grid, function)
                grads = torch.autograd.grad(value, params)
                flat[row] = torch.cat([g.reshape(-1) for g in grads])
            features[start:stop] = projector(flat[: stop - start]).cpu()
    return distributed.gather_blocks(features, len(images))


def gram_inverse(train_features, *, damping: float) -> torch.Tensor:
    """``(ΦᵀΦ + λI)⁻¹`` ``(d, d)`` in float64, ``λ = damping × mean eigenvalue of ΦᵀΦ``; ``ΦᵀΦ`` is
    summed chunk by chunk, so memory is ``d²`` whatever N."""
    gram = sum(chunk.double().T @ chunk.double() for chunk in row_chunks(train_features))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(0)
    lam = damping * eigenvalues.mean()
    if not torch.isfinite(lam):
        raise _damping_too_large(damping)
    return (eigenvectors / (eigenvalues + lam)) @ eigenvectors.T


def _damping_too_large(damping: float) -> DiffattrError:
    return DiffattrError(
        f"--damping {damping:g} is too large for float32 scores (they would round to 0): "
        "use a smaller value, or inf for the plain dot product"
    )


def kernel_scores(
    query_features: torch.Tensor, train_features, *, damping: float, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """D-TRAK scores ``φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ``: ``(Q, d), (N, d) → (Q, N)``, one chunk of Φ at a time.

    Args:
        train_features: Φ, a tensor or a sharded one.
        damping: ``λ / mean eigenvalue``; ``inf`` gives ``φ_q Φᵀ`` (the ranking of the limit, without
            the 1/λ factor).
        inverse: :func:`gram_inverse` of Φ at this damping, if already computed (one per training set).
    """
    if math.isinf(damping):
        return torch.cat([query_features @ chunk.T for chunk in row_chunks(train_features)], 1)
    if inverse is None:
        inverse = gram_inverse(train_features, damping=damping)
    left = query_features.double() @ inverse
    scores = torch.cat([left @ chunk.double().T for chunk in row_chunks(train_features)], 1)
    # λ so large that every score falls below float32's smallest normal: they would be 0s
    largest = scores.abs().max() if scores.numel() else scores.new_zeros(())
    if 0 < largest < torch.finfo(torch.float32).tiny:
        raise _damping_too_large(damping)
    return scores.float()
