"""diffattr: which training images made this generated image? Forward-INF for diffusers models."""

__version__ = "0.1.0"

from .attributor import AttributionResult, Attributor
from .audit import AuditConfig, AuditReport
from .config import AttributionConfig, ScoringConfig
from .data import ImageFolder
from .errors import DiffattrError
from .models import DiffusionModel

__all__ = [
    "AttributionConfig",
    "AttributionResult",
    "Attributor",
    "AuditConfig",
    "AuditReport",
    "DiffattrError",
    "DiffusionModel",
    "ImageFolder",
    "ScoringConfig",
]
