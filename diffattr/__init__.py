"""diffattr: which training images made this generated image? Forward-INF for diffusers models."""

__version__ = "0.2.0"

import importlib

# The public names, imported on first use: ``import diffattr`` (and ``diffattr --help``) stays
# free of torch until something that needs it is touched.
_EXPORTS = {
    "AttributionConfig": "config",
    "AttributionResult": "attributor",
    "Attributor": "attributor",
    "AuditConfig": "config",
    "AuditReport": "audit",
    "DiffattrError": "errors",
    "DiffusionModel": "denoisers",
    "Columns": "data",
    "ImageFolder": "data",
    "ScoringConfig": "config",
    "TrainingImages": "data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffattr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
