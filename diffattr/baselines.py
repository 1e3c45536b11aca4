"""The anchors beside Forward-INF: pixel ℓ2, CLIP cosine, TracIn and D-TRAK (``--method``).

Each scorer featurises the training set once (cached in ``<run-dir>/methods/``, under a file name
that hashes the settings, so features of one setting are never read for another) and then scores
any number of queries against it.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .clip import ClipEmbedder, cosine_similarity
from .config import GRADIENT_METHODS, METHODS, GradientConfig
from .errors import DiffattrError
from .gradients import kernel_matrix, projected_gradients
from .similarity import pixel_similarity
from .store import read_tensors, write_tensors

METHODS_DIR = "methods"


class BaselineScorer:
    """Scores queries against the training set of an :class:`~diffattr.attributor.Attributor`.

    Args:
        attributor: supplies the model, encodings, ids, grid, seed and run directory.
        method: ``pixel``, ``clip``, ``tracin`` or ``dtrak``.
        gradient: projection and damping of the gradient methods.
        clip: the CLIP model, required for ``clip``.
    """

    def __init__(self, attributor, method: str, *, gradient: GradientConfig | None = None, clip=None):
        if method not in METHODS[1:]:
            raise DiffattrError(f"--method {method!r}: must be one of {METHODS}")
        if method == "clip" and not isinstance(clip, ClipEmbedder):
            raise DiffattrError("--method clip needs --clip-model and --clip-weights (a local open_clip checkpoint)")
        self.attributor = attributor
        self.method = method
        self.gradient = gradient or GradientConfig()
        self.clip = clip
        self._features: torch.Tensor | None = None
        self._kernel: torch.Tensor | None = None

    @property
    def in_pixel_space(self) -> bool:
        """Pixel and CLIP compare images; the gradient methods work in the model's space."""
        return self.method in ("pixel", "clip")

    def settings(self) -> dict:
        """What shapes this method's numbers (besides the run's model, data, grid and seed)."""
        if self.method == "clip":
            return {"method": "clip", "clip_model": self.clip.name, "clip_weights": self.clip.weights}
        if self.method in GRADIENT_METHODS:
            return {"method": self.method, **self.gradient.to_dict()}
        return {"method": self.method}

    def train_features(self) -> torch.Tensor:
        """``(N, ...)`` training-side features, computed once and cached in the run directory."""
        if self._features is not None:
            return self._features
        if self.in_pixel_space and self.attributor.model.is_latent:
            encodings, conditions = self.attributor.training_images(), None
        else:
            encodings, conditions = self.attributor.encodings()
        if self.method == "pixel":
            self._features = encodings
            return encodings
        settings = {k: v for k, v in self.settings().items() if k != "damping"}  # λ only enters at query time
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = self.attributor.run.file(f"{METHODS_DIR}/{self.method}-{digest}.safetensors")
        if path.is_file():
            self._features = read_tensors(path)["features"]
        else:
            self._features = self._featurise(encodings, conditions, self.attributor.ids, description="training set")
            write_tensors(path, {"features": self._features}, metadata={"settings": json.dumps(settings)})
        return self._features

    def _featurise(self, images, conditions, names, *, description: str) -> torch.Tensor:
        a = self.attributor
        if self.method == "pixel":
            return images
        if self.method == "clip":
            return self.clip.embed(images)
        return projected_gradients(
            a.model,
            images,
            conditions,
            names,
            method=self.method,
            timesteps=a.timesteps,
            seed=a.scoring.seed,
            config=self.gradient,
            progress=a.progress,
            description=f"{self.method} gradients ({description})",
        )

    def scores(self, queries: torch.Tensor, conditions: torch.Tensor | None, names: list[str]) -> torch.Tensor:
        """``(Q, N)`` scores of ``queries`` (encodings ``(Q, C, H, W)``), higher = more influential.

        Args:
            conditions: ``(Q, ...)`` query conditions or ``None``.
            names: one name per query; seeds the query's noise for the gradient methods.
        """
        train = self.train_features()
        if self.method == "pixel":
            return pixel_similarity(queries, train)
        query_features = self._featurise(queries, conditions, names, description="queries")
        if self.method == "clip":
            return cosine_similarity(query_features, train)
        if self.method == "tracin":
            return query_features @ train.T
        if self._kernel is None:
            self._kernel = kernel_matrix(train, damping=self.gradient.damping)
        return query_features @ self._kernel
