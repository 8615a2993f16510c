"""robomimic HDF5 -> store: key mapping, masks, success, and a clear message for damaged or unfit files."""

import json

import h5py
import numpy as np
import pytest
from conftest import last_json

from robopolicy.data import DemoStore, StoreError, validate_store
from robopolicy.data.robomimic import import_robomimic


def write_robomimic(path, *, demos: int = 3, with_image: bool = True) -> None:
    """A robomimic-layout file: low-dim obs, one image key, rewards/dones, env_args and a train mask."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        data = h5.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}})
        for i in range(demos):
            length = 5 + i
            demo = data.create_group(f"demo_{i}")
            obs = {"robot0_eef_pos": rng.standard_normal((length, 3)), "object": rng.standard_normal((length, 2)),
                   "robot0_gripper_qpos": rng.standard_normal((length, 1))}
            for key, value in obs.items():
                demo.create_dataset(f"obs/{key}", data=value)
            if with_image:
                demo.create_dataset("obs/agentview_image", data=rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8))
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (length, 7)))
            rewards = np.zeros(length)
            rewards[-1] = 1.0 if i != 1 else 0.0  # demo_1 fails
            demo.create_dataset("rewards", data=rewards)
            dones = np.zeros(length, dtype=np.int64)
            dones[-1] = 1
            demo.create_dataset("dones", data=dones)
            demo.attrs["num_samples"] = length
        h5.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_2"]))
        h5.create_dataset("mask/valid", data=np.array([b"demo_1"]))


def test_import_maps_keys_and_keeps_values(tmp_path):
    write_robomimic(tmp_path / "lift.hdf5")
    summary = import_robomimic(tmp_path / "lift.hdf5", tmp_path / "store")
    assert summary["episodes"] == 3 and summary["fps"] == 20 and summary["task"] == "Lift"
    assert validate_store(tmp_path / "store") == []
    with h5py.File(tmp_path / "lift.hdf5") as h5, DemoStore.open(tmp_path / "store") as store:
        assert store.features["observation.state"]["names"] == [
            "object[0]", "object[1]", "robot0_eef_pos[0]", "robot0_eef_pos[1]", "robot0_eef_pos[2]",
            "robot0_gripper_qpos"]
        assert store.features["observation.images.agentview"]["shape"] == [8, 8, 3]
        episode = store.get_episode(2)
        demo = h5["data/demo_2"]
        expected_state = np.concatenate([demo["obs/object"][()], demo["obs/robot0_eef_pos"][()],
                                         demo["obs/robot0_gripper_qpos"][()]], axis=1).astype(np.float32)
        np.testing.assert_array_equal(episode["observation.state"], expected_state)
        np.testing.assert_array_equal(episode["observation.images.agentview"], demo["obs/agentview_image"][()])
        np.testing.assert_array_equal(episode["action"], demo["actions"][()].astype(np.float32))
        np.testing.assert_array_equal(episode["next.reward"], demo["rewards"][()].astype(np.float32))
        assert [ep["success"] for ep in store.episodes] == [True, False, True]
        assert store.episodes[2]["extra"] == {"demo": "demo_2"}
        assert store.info["env_args"]["env_name"] == "Lift"


def test_filter_key_selects_the_masked_demos(tmp_path):
    write_robomimic(tmp_path / "lift.hdf5")
    import_robomimic(tmp_path / "lift.hdf5", tmp_path / "train", filter_key="train")
    with DemoStore.open(tmp_path / "train") as store:
        assert [ep["extra"]["demo"] for ep in store.episodes] == ["demo_0", "demo_2"]
    with pytest.raises(ValueError, match=r"mask/test.*available: train, valid"):
        import_robomimic(tmp_path / "lift.hdf5", tmp_path / "x", filter_key="test")


def test_missing_actions_is_named(tmp_path):
    write_robomimic(tmp_path / "lift.hdf5", with_image=False)
    with h5py.File(tmp_path / "lift.hdf5", "a") as h5:
        del h5["data/demo_0/actions"]
    with pytest.raises(StoreError, match=r"demo_0 has no 'actions'"):
        import_robomimic(tmp_path / "lift.hdf5", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_damaged_hdf5_is_named(tmp_path):
    path = tmp_path / "lift.hdf5"
    write_robomimic(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(StoreError, match=r"lift\.hdf5.*damaged"):
        import_robomimic(path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_robomimic_file_imports_trains_and_evaluates_through_the_cli(cli, tmp_path):
    """A robomimic-layout file of builtin/reach demonstrations (state and front camera) -> `data import` ->
    `train` -> `eval`; and a file whose features do not fit the task is refused by `train` with the key named."""
    store = tmp_path / "reach"
    cli("collect", "task=builtin/reach", "episodes=6", f"out={store}", "obs.images=true", "obs.image_size=32",
        check=True)
    hdf5 = tmp_path / "reach.hdf5"
    with DemoStore.open(store) as demos, h5py.File(hdf5, "w") as h5:
        data = h5.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "builtin/reach", "env_kwargs": {"control_freq": demos.fps}})
        for i in range(demos.num_episodes):
            ep = demos.get_episode(i)
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("obs/state", data=ep["observation.state"])  # one low-dim key: the same vector
            demo.create_dataset("obs/front_image", data=ep["observation.images.front"])
            demo.create_dataset("actions", data=ep["action"])
            demo.create_dataset("rewards", data=ep["next.success"].astype(np.float64))
            demo.create_dataset("dones", data=ep["next.success"].astype(np.int64))
    imported = tmp_path / "imported"
    cli("data", "import", "format=robomimic", f"src={hdf5}", f"out={imported}", check=True)
    run = tmp_path / "run"
    cli("train", "task=builtin/reach", f"data={imported}", f"out={run}", "steps=30", "batch_size=16",
        "eval.every=0", "eval.final_episodes=0", "eval.videos=0", "checkpoint_every=30", check=True)
    result = last_json(cli("eval", f"ckpt={run}", "task=builtin/reach", "episodes=2", f"out={tmp_path / 'eval'}",
                           check=True))
    assert result["episodes"] == 2
    # the same file for a task with another state size: refused, naming the feature
    proc = cli("train", "task=builtin/push", f"data={imported}", f"out={tmp_path / 'run2'}", "steps=5")
    assert proc.returncode != 0 and "observation.state" in proc.stderr and "Traceback" not in proc.stderr
