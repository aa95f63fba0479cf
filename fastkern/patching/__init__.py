"""Applies the per-family specs in patches/ to a model instance. See fastkern.patching.core."""

from .core import patch_model, unpatch_model
from .report import PatchEntry, PatchReport

__all__ = ["patch_model", "unpatch_model", "PatchReport", "PatchEntry"]
