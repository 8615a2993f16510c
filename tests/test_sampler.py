"""Training windows: contents and padding at both episode edges, the image cache, batched reads, weights."""

import numpy as np
import pytest
import torch

from robopolicy.data import DemoStore, StoreError, WindowDataset

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [2], "names": ["frame", "episode"]},
    "observation.images.front": {"dtype": "uint8", "shape": [4, 5, 3], "names": None},
    "action": {"dtype": "float32", "shape": [1], "names": ["frame"]},
}
LENGTHS = (3, 7, 5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every value names its global frame: state = (frame, episode), action = frame, pixels = frame."""
    store = DemoStore.create(tmp_path_factory.mktemp("s") / "store", FEATURES, fps=10)
    frame = 0
    for episode, length in enumerate(LENGTHS):
        frames = np.arange(frame, frame + length)
        store.append_episode(
            {
                "observation.state": np.stack([frames, np.full(length, episode)], axis=1).astype(np.float32),
                "observation.images.front": np.broadcast_to(frames[:, None, None, None], (length, 4, 5, 3)).astype(np.uint8),
                "action": frames[:, None].astype(np.float32),
            },
            task="count",
            quality=[1.0, 0.5, 2.0][episode],
        )
        frame += length
    store.close()
    return DemoStore.open(store.path)


def test_one_item_per_frame(store):
    dataset = WindowDataset(store, n_obs_steps=2, horizon=4)
    assert len(dataset) == sum(LENGTHS)
    assert len(WindowDataset(store, 2, 4, episodes=[0, 2])) == LENGTHS[0] + LENGTHS[2]


def test_window_in_the_middle(store):
    # episode 1 spans frames 3..9; item 3 + 2 anchors at frame 5
    item = WindowDataset(store, n_obs_steps=2, horizon=4)[5]
    np.testing.assert_array_equal(item["observation.state"], [[4, 1], [5, 1]])
    np.testing.assert_array_equal(item["action"][:, 0], [4, 5, 6, 7])
    np.testing.assert_array_equal(item["action_is_pad"], [False] * 4)
    np.testing.assert_array_equal(item["observation.images.front"][:, 0, 0, 0], [4, 5])
    assert item["observation.state"].dtype == np.float32 and item["observation.images.front"].dtype == np.uint8
    assert item["observation.images.front"].shape == (2, 4, 5, 3)


def test_padding_at_episode_start(store):
    # anchor at the first frame of episode 1 (frame 3): the earlier observation repeats frame 3
    item = WindowDataset(store, n_obs_steps=3, horizon=5)[3]
    np.testing.assert_array_equal(item["observation.state"][:, 0], [3, 3, 3])
    np.testing.assert_array_equal(item["observation.images.front"][:, 0, 0, 0], [3, 3, 3])
    np.testing.assert_array_equal(item["action"][:, 0], [3, 3, 3, 4, 5])
    np.testing.assert_array_equal(item["action_is_pad"], [True, True, False, False, False])


def test_padding_at_episode_end(store):
    # anchor at frame 8 of episode 1 (last frame 9): actions 7..12 clamp to 9, never reach episode 2
    item = WindowDataset(store, n_obs_steps=2, horizon=6)[8]
    np.testing.assert_array_equal(item["observation.state"], [[7, 1], [8, 1]])
    np.testing.assert_array_equal(item["action"][:, 0], [7, 8, 9, 9, 9, 9])
    np.testing.assert_array_equal(item["action_is_pad"], [False, False, False, True, True, True])


def test_short_episode_padded_on_both_sides(store):
    item = WindowDataset(store, n_obs_steps=2, horizon=6)[0]  # episode 0 is frames 0..2
    np.testing.assert_array_equal(item["action"][:, 0], [0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(item["action_is_pad"], [True, False, False, False, True, True])


def test_every_window_matches_a_reference(store):
    """Brute-force reference of the window convention over every item."""
    n_obs, horizon = 2, 5
    dataset = WindowDataset(store, n_obs, horizon)
    ends = np.cumsum(LENGTHS)
    for index in range(len(dataset)):
        episode = int(np.searchsorted(ends, index, side="right"))
        start, end = ends[episode] - LENGTHS[episode], ends[episode]
        obs = [max(index + k, start) for k in range(1 - n_obs, 1)]
        raw = [index - n_obs + 1 + j for j in range(horizon)]
        item = dataset[index]
        np.testing.assert_array_equal(item["observation.state"][:, 0], obs)
        np.testing.assert_array_equal(item["action"][:, 0], np.clip(raw, start, end - 1))
        np.testing.assert_array_equal(item["action_is_pad"], [not start <= r < end for r in raw])


def test_get_batch_equals_stacked_items(store):
    dataset = WindowDataset(store, 2, 4)
    indices = [14, 0, 5, 5, 9]
    batch = dataset.get_batch(indices)
    for key, values in batch.items():
        np.testing.assert_array_equal(values, np.stack([dataset[i][key] for i in indices]))
    assert batch["observation.images.front"].shape == (5, 2, 4, 5, 3)


def test_image_cache_returns_identical_data(store):
    cached = WindowDataset(store, 2, 4, image_cache_chunks=3)
    uncached = WindowDataset(store, 2, 4, image_cache_chunks=0)
    order = np.random.default_rng(0).integers(0, len(cached), 60)
    for index in order:
        np.testing.assert_array_equal(cached[index]["observation.images.front"], uncached[index]["observation.images.front"])
    assert len(cached._cache) == 3 and len(uncached._cache) == 0
    direct = store.read("observation.images.front")
    np.testing.assert_array_equal(cached.get_batch(np.arange(len(cached)))["observation.images.front"][:, 1], direct)


def test_keys_select_what_items_hold(store):
    item = WindowDataset(store, 2, 4, keys=["observation.state", "action"])[4]
    assert set(item) == {"observation.state", "action", "action_is_pad"}
    with pytest.raises(StoreError, match="no feature 'observation.images.side'"):
        WindowDataset(store, 2, 4, keys=["observation.images.side", "action"])
    with pytest.raises(StoreError, match="episodes"):
        WindowDataset(store, 2, 4, episodes=[3])
    with pytest.raises(StoreError, match="n_obs_steps"):
        WindowDataset(store, 5, 4)


def test_sample_weights_follow_episode_quality(store):
    dataset = WindowDataset(store, 2, 4, episodes=[2, 1])
    np.testing.assert_array_equal(dataset.sample_weights(), [2.0] * 5 + [0.5] * 7)
    sampler = torch.utils.data.WeightedRandomSampler(dataset.sample_weights(), num_samples=2000, generator=torch.Generator().manual_seed(0))
    from_episode_2 = np.mean([dataset[i]["observation.state"][0, 1] == 2 for i in sampler])
    assert 0.65 < from_episode_2 < 0.80  # 10 / (10 + 3.5) = 0.74


def test_dataloader_with_worker_processes(store):
    dataset = WindowDataset(store, 2, 4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, num_workers=2)
    batches = list(loader)
    states = torch.cat([b["observation.state"] for b in batches])
    assert states.shape == (len(dataset), 2, 2) and states.dtype == torch.float32
    np.testing.assert_array_equal(states[:, 1, 0].numpy(), np.arange(len(dataset)))
    assert batches[0]["observation.images.front"].shape == (4, 2, 4, 5, 3)
