"""The anchors beside Forward-INF (``--method``): one small :class:`Scorer` interface and its registry.

A scorer featurises images (the training set once, then each query) and scores query features
against training features, read one chunk of training rows at a time (a tensor, or the run
directory's sharded features: memory flat in N). It works on tensors only — the model, the run's grid and seed come in
a :class:`ScorerContext` — so the Attributor, the benchmarks and the tests all call it the same
way. Adding a baseline is one subclass registered here (plus its test); ``--method`` lists the
registry. The Attributor caches the training features of a ``cached`` scorer in the run directory
under a name that hashes :meth:`Scorer.feature_settings`.

Importing this module does not import torch (``diffattr --help`` reads the registry); the scorers
import their numerics when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .config import GradientConfig
from .errors import DiffattrError

if TYPE_CHECKING:
    import torch

    from .denoisers import Denoiser

SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Registers a baseline under ``cls.name`` (a class decorator)."""
    if cls.name in SCORERS or cls.name == "forward-inf":
        raise ValueError(f"method {cls.name!r} is registered twice")
    SCORERS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every ``--method``: diffattr's own, then the registered baselines."""
    return ("forward-inf", *SCORERS)


@dataclass
class ScorerContext:
    """What a scorer may use: the model, the run's grid and seed, and the baselines' settings."""

    model: Denoiser
    timesteps: torch.Tensor
    seed: int
    gradient: GradientConfig
    clip: Any = None  # a diffattr.clip.ClipEmbedder, for the CLIP baseline
    progress: bool = False


class Scorer:
    """One baseline.

    Class attributes:
        name: its ``--method`` value.
        space: ``"pixels"`` (compares images; latent models get the images, not the latents) or
            ``"encodings"`` (works in the model's own space, under the images' conditions).
        cached: training features are worth saving in the run directory.
    """

    name: ClassVar[str]
    space: ClassVar[str] = "encodings"
    cached: ClassVar[bool] = True

    def __init__(self, context: ScorerContext):
        self.context = context

    def settings(self) -> dict:
        """What shapes this method's numbers (besides the run's model, data, grid and seed)."""
        return {"method": self.name}

    def feature_settings(self) -> dict:
        """What shapes the training features (the cache key); query-time settings left out."""
        return self.settings()

    def featurise(
        self, images: torch.Tensor, conditions: torch.Tensor | None, names: list[str], *, description: str
    ) -> torch.Tensor:
        """``(B, ...)`` features of images (or encodings) with their conditions; ``names`` seed noise."""
        raise NotImplementedError

    def scores(self, query_features: torch.Tensor, train_features) -> torch.Tensor:
        """``(Q, N)`` scores, higher = more influential; ``train_features``: ``(N, ...)``, a tensor or
        a row source with ``chunks()`` (``shards.py``), scored chunk by chunk."""
        import torch

        from .shards import row_chunks

        return torch.cat([self.score_block(query_features, chunk) for chunk in row_chunks(train_features)], 1)

    def score_block(self, query_features: torch.Tensor, train_block: torch.Tensor) -> torch.Tensor:
        """``(Q, B)`` scores against a block of training features (a score depends on one pair only)."""
        raise NotImplementedError


@register_scorer
class PixelScorer(Scorer):
    """−mean squared pixel distance: look-alikes, not influence."""

    name = "pixel"
    space = "pixels"
    cached = False  # the features are the images themselves

    def featurise(self, images, conditions, names, *, description):
        return images

    def score_block(self, query_features, train_block):
        from .similarity import pixel_similarity

        return pixel_similarity(query_features, train_block)


@register_scorer
class ClipScorer(Scorer):
    """CLIP cosine similarity (open_clip, local weights only)."""

    name = "clip"
    space = "pixels"

    def __init__(self, context: ScorerContext):
        from .clip import ClipEmbedder

        if not isinstance(context.clip, ClipEmbedder):
            raise DiffattrError("--method clip needs --clip-model and --clip-weights (a local open_clip checkpoint)")
        super().__init__(context)

    def settings(self):
        clip = self.context.clip
        return {"method": self.name, "clip_model": clip.name, "clip_weights": clip.weights, "clip": clip.fingerprint}

    def featurise(self, images, conditions, names, *, description):
        return self.context.clip.embed(images)

    def score_block(self, query_features, train_block):
        from .clip import cosine_similarity

        return cosine_similarity(query_features, train_block)


@register_scorer
class TracInScorer(Scorer):
    """TracIn with one checkpoint: ⟨P∇L(q), P∇L(x)⟩ (see ``gradients.py``)."""

    name = "tracin"

    def settings(self):
        settings = {"method": self.name, **self.context.gradient.to_dict()}
        if settings["projection"] == "gaussian":  # the projection before it was a setting: its caches still hold
            del settings["projection"]
        return settings

    def feature_settings(self):
        return {k: v for k, v in self.settings().items() if k != "damping"}  # λ only enters at query time

    def featurise(self, images, conditions, names, *, description):
        from .gradients import projected_gradients

        c = self.context
        return projected_gradients(
            c.model,
            images,
            conditions,
            names,
            method=self.name,
            timesteps=c.timesteps,
            seed=c.seed,
            config=c.gradient,
            progress=c.progress,
            description=f"{self.name} gradients ({description})",
        )

    def score_block(self, query_features, train_block):
        return query_features @ train_block.T


@register_scorer
class DTrakScorer(TracInScorer):
    """D-TRAK: φ = P∇‖ε_θ(x_t, t)‖², score φ_q (ΦᵀΦ + λI)⁻¹ φ_x (see ``gradients.py``)."""

    name = "dtrak"

    def __init__(self, context: ScorerContext):
        super().__init__(context)
        self._inverse: tuple[Any, torch.Tensor] | None = None  # (training features, (ΦᵀΦ + λI)⁻¹)

    def scores(self, query_features, train_features):
        import math

        from .gradients import gram_inverse, kernel_scores

        damping = self.context.gradient.damping
        if not math.isinf(damping) and (self._inverse is None or self._inverse[0] is not train_features):
            self._inverse = (train_features, gram_inverse(train_features, damping=damping))  # one per training set
        inverse = None if math.isinf(damping) else self._inverse[1]
        return kernel_scores(query_features, train_features, damping=damping, inverse=inverse)
