"""CLIP image embeddings with open_clip, from local weights only (never downloaded).

Used by the CLIP-similarity baseline and by the gallery (CLIP similarity beside each influence
score). Images arrive as diffattr pixels (``(B, C, H, W)`` in [-1, 1], 1 or 3 channels) and are
converted, resized and normalised here in torch, so no PIL round trip is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .data import file_digest
from .errors import DiffattrError
from .store import read_json

# open_clip's defaults for models trained on OpenAI's recipe.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEmbedder:
    """Unit-norm CLIP image embeddings.

    Args:
        model_name: an open_clip architecture name (``ViT-B-32``, …), or the path of an open_clip
            model-config JSON file (its stem becomes the name) for custom architectures.
        weights: a local checkpoint (``.safetensors``, or ``.pt``/``.bin`` read with
            ``weights_only=True``); ``None`` keeps random weights (tests only).
        device: where the model runs.
    """

    def __init__(self, model_name: str, weights: str | Path | None, *, device: str | torch.device = "cpu"):
        import open_clip  # heavy import: only when CLIP is asked for

        config_file = None
        if model_name.endswith(".json"):
            config = config_file = Path(model_name)
            if not config.is_file():
                raise DiffattrError(f"--clip-model {config}: no such open_clip config file")
            read_json(config, advice="fix or replace the file")  # a clear error for a broken file, before open_clip's
            open_clip.add_model_config(config)
            model_name = config.stem
        if model_name not in open_clip.list_models():
            raise DiffattrError(f"--clip-model {model_name!r}: not an open_clip architecture (open_clip.list_models())")
        if weights is not None and not Path(weights).is_file():
            raise DiffattrError(f"--clip-weights {weights}: no such file; give a local open_clip checkpoint")
        self.device = torch.device(device)
        try:
            self.model = open_clip.create_model(
                model_name, pretrained=None if weights is None else str(weights), device=self.device
            ).eval()
        except Exception as error:  # truncated or foreign checkpoints raise whatever their reader raises
            raise DiffattrError(
                f"--clip-weights {weights}: cannot load it as {model_name} weights ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}); give a local open_clip checkpoint"
            ) from None
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.name = model_name
        self.weights = None if weights is None else str(weights)
        # Content, not paths: a checkpoint or config overwritten in place gives new features.
        files = [Path(f) for f in (weights, config_file) if f is not None]
        self.fingerprint = ":".join(file_digest(f) for f in files)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``(B, C, H, W)`` images in [-1, 1]; returns ``(B, D)`` unit vectors on the CPU."""
        chunks = []
        for start in range(0, len(pixels), batch_size):
            batch = self._preprocess(pixels[start : start + batch_size].to(self.device))
            chunks.append(F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.visual.output_dim)

    def _preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels.float() + 1) / 2
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        mean = torch.tensor(_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


def cosine_similarity(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """``(Q, D)`` × ``(N, D)`` unit vectors → ``(Q, N)`` cosine similarities."""
    return queries @ train.T
