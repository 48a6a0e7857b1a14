"""Applying policies to models: channel removal and the importance criteria that pick channels."""

from autoprune.pruning.channel import ChannelPruner
from autoprune.pruning.criteria import CRITERIA, get_criterion

__all__ = ["CRITERIA", "ChannelPruner", "get_criterion"]
