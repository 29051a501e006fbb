"""Optional, order-independent extras: printing, timing, image galleries, W&B tables."""

from callbacks.epoch_summary import EpochSummary
from callbacks.gallery import Gallery

__all__ = ["EpochSummary", "Gallery"]
