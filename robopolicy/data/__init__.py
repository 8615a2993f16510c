"""Demonstration store (zarr v3, atomic append), its validation and statistics, the training-window sampler."""

from robopolicy.data.store import FORMAT_VERSION, SOURCES, DemoStore, StoreError
from robopolicy.data.validate import validate_store

__all__ = ["FORMAT_VERSION", "SOURCES", "DemoStore", "StoreError", "WindowDataset", "validate_store"]


def __getattr__(name: str):
    # the sampler pulls in torch; a robot computer recording episodes only needs the store
    if name == "WindowDataset":
        from robopolicy.data.sampler import WindowDataset

        return WindowDataset
    raise AttributeError(f"module 'robopolicy.data' has no attribute {name!r}")
