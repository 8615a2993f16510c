"""Demonstration store (zarr v3, atomic append), its validation and statistics, the training-window sampler.

The names are loaded on first use: `robopolicy.data.spec` (the shared feature names) is imported by simulators,
policies and the robot computer, which should not pay for zarr (the store) or torch (the sampler) until they
use them.
"""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "SOURCES", "DemoStore", "StoreError", "WindowDataset", "validate_store"]


def __getattr__(name: str):
    if name in ("FORMAT_VERSION", "SOURCES", "DemoStore", "StoreError"):
        from robopolicy.data import store

        return getattr(store, name)
    if name == "validate_store":
        from robopolicy.data.validate import validate_store

        return validate_store
    if name == "WindowDataset":
        from robopolicy.data.sampler import WindowDataset

        return WindowDataset
    raise AttributeError(f"module 'robopolicy.data' has no attribute {name!r}")
