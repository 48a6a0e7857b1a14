"""Search agents. Each module implements one method; all share :mod:`autoprune.agents.base`."""

from autoprune.agents import amc, energy, gates, icepick, netadapt, random, sensitivity, uniform  # noqa: F401  (registers the built-in agents)
from autoprune.agents.base import (
    AGENTS,
    Agent,
    Limits,
    Option,
    Reporter,
    SearchContext,
    SearchResult,
    get_agent,
    list_agents,
    register,
)

__all__ = [
    "AGENTS",
    "Agent",
    "Limits",
    "Option",
    "Reporter",
    "SearchContext",
    "SearchResult",
    "get_agent",
    "list_agents",
    "register",
]
