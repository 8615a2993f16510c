"""benchmarks/train_targets.py's collect: a store left in a work folder is reused only when the same task, count and
task code (sim/'s git tree) made it; anything else collects afresh."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_store_reused_only_when_its_stamp_matches(tmp_path, monkeypatch):
    targets = load_benchmark("train_targets")
    calls = []

    def fake_run(*args):  # the collect command itself is tested elsewhere; here only whether it runs
        calls.append(args)
        out = next(a.split("=", 1)[1] for a in args if a.startswith("out="))
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "zarr.json").write_text("{}")
        return {"store": out}

    monkeypatch.setattr(targets, "run", fake_run)
    monkeypatch.setattr(targets, "_sim_version", lambda: "tree-a")
    store = tmp_path / "data" / "push"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")  # a store from an earlier run, no stamp: never trusted
    assert "reused" not in targets.collect("builtin/push", store, 50, images=False)
    assert targets.collect("builtin/push", store, 50, images=False)["reused"]
    assert "reused" not in targets.collect("builtin/push", store, 20, images=False)  # another count
    assert len(calls) == 2
    monkeypatch.setattr(targets, "_sim_version", lambda: "tree-b")  # the tasks' code changed
    assert "reused" not in targets.collect("builtin/push", store, 20, images=False)
    monkeypatch.setattr(targets, "_sim_version", lambda: None)  # uncommitted changes under sim/: never reused
    targets.collect("builtin/push", store, 20, images=False)
    assert "reused" not in targets.collect("builtin/push", store, 20, images=False)
    assert json.loads((store.parent / "push.stamp.json").read_text())["episodes"] == 20


def test_sim_version_is_the_tree_of_sim():
    version = load_benchmark("train_targets")._sim_version()
    assert version is None or len(version) == 40
