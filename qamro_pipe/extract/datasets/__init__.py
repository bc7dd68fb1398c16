"""Dataset loaders: one module per published layout, all returning DatasetRecords."""
from .base import Clip, DatasetRecords, load_dataset, register_dataset

__all__ = ["Clip", "DatasetRecords", "load_dataset", "register_dataset"]
