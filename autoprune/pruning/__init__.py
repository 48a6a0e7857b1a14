"""Applying policies to models: channel removal and the importance criteria that pick channels, and
weight masks for the unstructured and N:M granularities."""

from autoprune.pruning.channel import ChannelPruner
from autoprune.pruning.criteria import CRITERIA, get_criterion
from autoprune.pruning.masks import MASK_CRITERIA, MaskPruner

__all__ = ["CRITERIA", "MASK_CRITERIA", "ChannelPruner", "MaskPruner", "get_criterion"]
