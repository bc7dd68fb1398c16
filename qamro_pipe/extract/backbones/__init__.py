"""Frozen audio models under versioned names; weights load only in `load()`."""
from . import aesthetics, clap, melstats, muq  # noqa: F401  (each registers its backbone)
from .base import REGISTRY, Backbone, FeatureSpec, get_backbone, register_backbone

__all__ = ["REGISTRY", "Backbone", "FeatureSpec", "get_backbone", "register_backbone"]
