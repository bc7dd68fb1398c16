"""Dataset loaders: one module per published layout, all returning DatasetRecords."""
from . import aes_natural, demo, manifest, musiceval  # noqa: F401  (each registers its loader)
from .base import Clip, DatasetRecords, load_dataset, register_dataset

__all__ = ["Clip", "DatasetRecords", "load_dataset", "register_dataset"]
