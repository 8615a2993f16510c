"""Kept for one release: prefix-preserving sampling is now declared by each policy (`supports_prefix`) and
implemented in its own `sample_chunk(obs, noise, prefix_actions)` (flow.py, diffusion.py)."""

from __future__ import annotations

from typing import Any


def servable_policy(policy: Any) -> Any:
    """The policy as served: every policy now carries its own prefix-preserving sampling."""
    return policy
