"""The demonstration store: round trip, input checks, statistics, and validate_store naming each damage."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from robopolicy.data import DemoStore, StoreError, validate_store

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
    "observation.images.front": {"dtype": "uint8", "shape": [8, 10, 3], "names": None},
    "action": {"dtype": "float32", "shape": [2], "names": ["vx", "vy"]},
    "next.reward": {"dtype": "float32", "shape": [], "names": None},
    "next.success": {"dtype": "bool", "shape": [], "names": None},
}


def make_episode(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    return {
        "observation.state": rng.normal(size=(length, 3)).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (length, 8, 10, 3), dtype=np.uint8),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
        "next.reward": rng.random(length).astype(np.float32),
        "next.success": np.arange(length) == length - 1,
    }


@pytest.fixture
def filled(tmp_path):
    """A store with three episodes, and the episodes written into it."""
    rng = np.random.default_rng(0)
    episodes = [make_episode(rng, n) for n in (5, 9, 4)]
    store = DemoStore.create(tmp_path / "store", FEATURES, fps=10, info={"robot": "sim"})
    for i, episode in enumerate(episodes):
        store.append_episode(episode, task=f"task {i}", source="expert", success=i != 1, extra={"seed": i})
    store.close()
    return tmp_path / "store", episodes


def test_round_trip_survives_reopen(filled):
    path, episodes = filled
    store = DemoStore.open(path)
    assert store.fps == 10 and store.info == {"robot": "sim"}
    assert store.features["action"] == FEATURES["action"]
    assert store.num_episodes == 3 and store.num_frames == 18
    np.testing.assert_array_equal(store.episode_ends, [5, 14, 18])
    assert [e["task"] for e in store.episodes] == ["task 0", "task 1", "task 2"]
    assert [e["success"] for e in store.episodes] == [True, False, True]
    assert store.episodes[2] == {
        "index": 2, "length": 4, "task": "task 2", "source": "expert", "success": True, "quality": 1.0,
        "extra": {"seed": 2},
    }
    for i, episode in enumerate(episodes):
        got = store.get_episode(i)
        for key, values in episode.items():
            assert got[key].dtype == values.dtype
            np.testing.assert_array_equal(got[key], values)
    np.testing.assert_array_equal(store.read("action", 3, 7), np.concatenate([e["action"] for e in episodes])[3:7])
    assert validate_store(path) == []


def test_append_after_reopen(filled):
    path, episodes = filled
    store = DemoStore.open(path, mode="a")
    extra = make_episode(np.random.default_rng(1), 6)
    assert store.append_episode(extra, task="more", source="intervention", quality=0.5) == 3
    store.close()
    store = DemoStore.open(path)
    assert store.num_episodes == 4 and store.num_frames == 24
    assert store.episodes[3]["source"] == "intervention" and store.episodes[3]["quality"] == 0.5
    np.testing.assert_array_equal(store.get_episode(3)["observation.images.front"], extra["observation.images.front"])
    np.testing.assert_array_equal(store.get_episode(0)["action"], episodes[0]["action"])
    assert validate_store(path) == []


def test_read_only_store_refuses_writes(filled):
    store = DemoStore.open(filled[0])
    with pytest.raises(StoreError, match="read-only"):
        store.append_episode(filled[1][0], task="x")


def test_second_writer_is_refused(filled):
    with DemoStore.open(filled[0], mode="a"):
        with pytest.raises(StoreError, match="already open for appending"):
            DemoStore.open(filled[0], mode="a")


def test_set_quality_persists(filled):
    path, _ = filled
    with DemoStore.open(path, mode="a") as store:
        store.set_quality([0.0, 2.0, 0.5])
        with pytest.raises(StoreError, match="2 weights for 3 episodes"):
            store.set_quality([1.0, 1.0])
        with pytest.raises(StoreError, match="episode 1"):
            store.set_quality([1.0, float("nan"), 1.0])
    assert [e["quality"] for e in DemoStore.open(path).episodes] == [0.0, 2.0, 0.5]
    assert validate_store(path) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.pop("action"), "lacks key 'action'"),
        (lambda f: f.update(gripper=np.zeros((5, 1), np.float32)), "key 'gripper'"),
        (lambda f: f.update(action=np.zeros((5, 3), np.float32)), r"frames\['action'\] has shape \[5, 3\]"),
        (lambda f: f.update(action=np.zeros((4, 2), np.float32)), "different lengths"),
        (lambda f: f.update({"observation.images.front": np.zeros((5, 8, 10, 3), np.float32)}),
         r"frames\['observation.images.front'\] has dtype float32"),
        (lambda f: f.update({"next.success": np.zeros(5, np.float32)}), r"frames\['next.success'\] has dtype"),
        (lambda f: f["observation.state"].__setitem__((2, 1), np.nan), r"frames\['observation.state'\] holds NaN.*frame 2"),
        (lambda f: f["action"].__setitem__((4, 0), np.inf), r"frames\['action'\] holds NaN or inf"),
    ],
)
def test_bad_frames_are_refused_naming_the_key(tmp_path, edit, message):
    store = DemoStore.create(tmp_path / "s", FEATURES, fps=10)
    frames = make_episode(np.random.default_rng(0), 5)
    edit(frames)
    with pytest.raises(StoreError, match=message):
        store.append_episode(frames, task="t")
    assert store.num_episodes == 0 and validate_store(tmp_path / "s") == []


def test_bad_episode_metadata_is_refused(tmp_path):
    store = DemoStore.create(tmp_path / "s", FEATURES, fps=10)
    frames = make_episode(np.random.default_rng(0), 5)
    with pytest.raises(StoreError, match="source 'robot'"):
        store.append_episode(frames, task="t", source="robot")
    with pytest.raises(StoreError, match="quality"):
        store.append_episode(frames, task="t", quality=-1)
    with pytest.raises(StoreError, match="extra must be JSON"):
        store.append_episode(frames, task="t", extra={"a": object()})


def test_float64_input_is_stored_as_float32(tmp_path):
    store = DemoStore.create(tmp_path / "s", FEATURES, fps=10)
    frames = make_episode(np.random.default_rng(0), 5)
    frames["observation.state"] = frames["observation.state"].astype(np.float64)
    store.append_episode(frames, task="t")
    assert store.get_episode(0)["observation.state"].dtype == np.float32


def test_create_refuses_existing_paths(filled, tmp_path):
    path, _ = filled
    with pytest.raises(StoreError, match="already exists"):
        DemoStore.create(path, FEATURES, fps=10)
    assert DemoStore.open(path).num_episodes == 3  # untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a demonstration store; refusing"):
        DemoStore.create(other, FEATURES, fps=10, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    fresh = DemoStore.create(path, FEATURES, fps=5, overwrite=True)
    assert fresh.num_episodes == 0 and fresh.fps == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "store"]  # no temp dirs left


def test_create_rejects_bad_features(tmp_path):
    with pytest.raises(StoreError, match="'action': dtype 'float16'"):
        DemoStore.create(tmp_path / "s", {"action": {"dtype": "float16", "shape": [2]}}, fps=10)
    with pytest.raises(StoreError, match="images must be uint8"):
        DemoStore.create(tmp_path / "s", {"observation.images.a": {"dtype": "uint8", "shape": [8, 8]}}, fps=10)
    assert not (tmp_path / "s").exists()


def test_open_names_a_bad_path(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        DemoStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a demonstration store"):
        DemoStore.open(tmp_path / "empty")
    with pytest.raises(StoreError, match="mode must be"):
        DemoStore.open(tmp_path / "empty", mode="w")


def test_stats_match_numpy_and_are_cached(filled):
    path, episodes = filled
    with DemoStore.open(path, mode="a") as store:
        stats = store.stats
    state = np.concatenate([e["observation.state"] for e in episodes]).astype(np.float64)
    for name, expected in [("mean", state.mean(0)), ("std", state.std(0)), ("min", state.min(0)),
                           ("max", state.max(0)), ("q01", np.quantile(state, 0.01, axis=0)),
                           ("q99", np.quantile(state, 0.99, axis=0))]:
        np.testing.assert_allclose(stats["observation.state"][name], expected, rtol=1e-5, atol=1e-6)
    pixels = np.concatenate([e["observation.images.front"] for e in episodes]).reshape(-1, 3) / 255.0
    for name, expected in [("mean", pixels.mean(0)), ("std", pixels.std(0)), ("min", pixels.min(0)),
                           ("max", pixels.max(0)), ("q01", np.quantile(pixels, 0.01, axis=0)),
                           ("q99", np.quantile(pixels, 0.99, axis=0))]:
        np.testing.assert_allclose(stats["observation.images.front"][name], expected, rtol=1e-5, atol=1e-6)
    assert stats["next.reward"]["mean"].shape == ()
    # cached in the root metadata: a read-only reopen gets the same numbers without recomputing
    assert "stats" in json.loads((path / "zarr.json").read_text())["attributes"]
    reopened = DemoStore.open(path).stats
    np.testing.assert_array_equal(reopened["action"]["q99"], stats["action"]["q99"])
    # appending invalidates the cache
    with DemoStore.open(path, mode="a") as store:
        store.append_episode(make_episode(np.random.default_rng(5), 3), task="t")
    assert "stats" not in json.loads((path / "zarr.json").read_text())["attributes"]


# ------------------------------------------------------------------------------------------- validate_store
def _edit_root_attrs(path: Path, edit) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def _chunk_file(path: Path, key: str, index: int) -> Path:
    files = sorted((path / "data" / key / "c" / str(index)).rglob("*"))
    return [f for f in files if f.is_file()][0]


def test_validate_clean_store(filled):
    assert validate_store(filled[0]) == []


def test_validate_missing_or_garbled_root(filled, tmp_path):
    path, _ = filled
    assert "does not exist" in validate_store(tmp_path / "nope")[0]
    (path / "zarr.json").write_text('{"attributes": {"format": "robopolicy.demo')
    assert "garbled" in validate_store(path)[0]


def test_validate_wrong_format_version(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a.update(format_version=99))
    assert "format_version 99" in validate_store(path)[0]


def test_validate_truncated_chunk(filled):
    path, _ = filled
    chunk = _chunk_file(path, "observation.images.front", 7)
    chunk.write_bytes(chunk.read_bytes()[:20])
    problems = validate_store(path)
    assert len(problems) == 1
    assert "data/observation.images.front chunk 7" in problems[0] and "damaged" in problems[0]


def test_validate_flipped_bytes(filled):
    path, _ = filled
    chunk = _chunk_file(path, "observation.state", 0)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = validate_store(path)
    assert any("data/observation.state chunk 0" in p and "checksum" in p for p in problems)


def test_validate_deleted_chunk(filled):
    path, _ = filled
    _chunk_file(path, "observation.images.front", 3).unlink()
    assert "data/observation.images.front chunk 3" in validate_store(path)[0]


def test_validate_changed_episode_end(filled):
    path, _ = filled
    ends = zarr.open_array(path / "meta" / "episode_ends", mode="r+")
    ends[1] = 12
    problems = validate_store(path)
    assert any("episode 1 metadata has length 9, but meta/episode_ends gives 7" in p for p in problems)


def test_validate_edited_episode_length(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a["episodes"][0].update(length=6))
    assert any("episode 0 metadata has length 6" in p for p in validate_store(path))


def test_validate_episode_ends_not_increasing(filled):
    path, _ = filled
    ends = zarr.open_array(path / "meta" / "episode_ends", mode="r+")
    ends[0] = 15
    assert any("not strictly increasing" in p for p in validate_store(path))


def test_validate_episode_ends_past_data(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a.update(num_frames=40))
    problems = validate_store(path)
    assert any("data/action holds 18 frames, fewer than the committed 40" in p for p in problems)


def test_validate_deleted_feature_spec(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a["features"].pop("action"))
    assert any("array data/action has no feature spec" in p for p in validate_store(path))


def test_validate_spec_disagrees_with_array(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a["features"]["observation.state"].update(shape=[4]))
    _edit_root_attrs(path, lambda a: a["features"]["action"].update(dtype="float64"))
    problems = validate_store(path)
    assert any("data/observation.state has frame shape [3], its feature spec says [4]" in p for p in problems)
    assert any("data/action has dtype float32, its feature spec says float64" in p for p in problems)


def test_validate_metadata_count_mismatch(filled):
    path, _ = filled
    _edit_root_attrs(path, lambda a: a["episodes"].pop())
    assert any("commits 3 episodes but holds metadata for 2" in p for p in validate_store(path))


def test_validate_nan_in_data(filled):
    path, _ = filled
    zarr.open_array(path / "data" / "action", mode="r+")[11, 1] = np.nan
    assert any("data/action holds NaN or inf (first at frame 11)" in p for p in validate_store(path))


def test_validate_stats_shape(filled):
    path, _ = filled
    with DemoStore.open(path, mode="a") as store:
        store.compute_stats()
    assert validate_store(path) == []
    _edit_root_attrs(path, lambda a: a["stats"]["action"].update(mean=[0.0, 0.0, 0.0]))
    assert any("cached stats 'action'/mean have shape [3], the data needs [2]" in p for p in validate_store(path))


def test_uncommitted_tail_is_ignored(filled):
    """Data a killed append left past the commit point is invisible, valid, and overwritten next time."""
    path, episodes = filled
    for key in FEATURES:
        array = zarr.open_array(path / "data" / key, mode="r+")
        array.resize((30, *array.shape[1:]))
        array[18:30] = np.ones((12, *array.shape[1:]), dtype=array.dtype)
    (path / "data" / "action" / "zarr.abc123.partial").write_bytes(b"half a write")
    assert validate_store(path) == []
    assert DemoStore.open(path).num_frames == 18
    with DemoStore.open(path, mode="a") as store:
        new = make_episode(np.random.default_rng(9), 2)
        store.append_episode(new, task="after")
    assert not list(path.rglob("*.partial"))
    store = DemoStore.open(path)
    assert store.num_frames == 20 and store.array("action").shape[0] == 20
    np.testing.assert_array_equal(store.get_episode(3)["observation.images.front"], new["observation.images.front"])
    assert validate_store(path) == []


def test_open_names_a_damaged_array(filled):
    path, _ = filled
    (path / "data" / "action" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot be opened.*validate_store"):
        DemoStore.open(path)
    assert any("array data/action cannot be opened" in p for p in validate_store(path))


def test_a_store_that_fails_to_open_leaves_no_error_behind(tmp_path, monkeypatch):
    """A store that fails to open (a missing store, or a call without its mode) raises its one error; the half-built
    object's cleanup raises nothing more."""
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(StoreError):
        DemoStore.open(tmp_path / "missing")
    with pytest.raises(TypeError):
        DemoStore(tmp_path / "missing")  # __init__ never ran
    gc.collect()
    assert not unraisable
