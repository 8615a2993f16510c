"""MetaWorld v3 tasks (`metaworld/<name>`) behind the project's observation keys, with MetaWorld's scripted experts.

We build the task class directly rather than through `gym.make("Meta-World/MT1")`: MT1 hides the goal from the
observation and draws from 50 fixed goal variations, while a policy learned from demonstrations needs to see the
goal, and `reset(seed=s)` should fully determine an episode (the goal-observable setting of
`metaworld.env_dict.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE`, but reseedable at every reset).
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY, image_key
from sim.rendering import OffscreenRenderer

# MetaWorld's 39-d observation (SawyerXYZEnv._get_obs): this frame's hand position, gripper opening and two object
# poses (`_get_curr_obs_combined_no_goal`, a quaternion after each position; zeros where a task has one object), the
# previous frame's 18, then the goal. Named `entity.field`, so a policy that groups dimensions by entity (the vla: one
# token per entity) sees 7 entities: hand, gripper, obj (both objects: names drop trailing digits), their prev_
# copies, and goal. The quaternion is named xyzw, scipy's order, which most tasks use (push, reach, door-open); about
# 20 tasks (drawer-open, button-press-topdown, ...) give MuJoCo's wxyz there instead.
_FRAME_ENTITIES = {"hand": ("x", "y", "z"), "gripper": ("opening",),
                   **{f"obj{i}": ("x", "y", "z", "qx", "qy", "qz", "qw") for i in (1, 2)}}
_FRAME_NAMES = [f"{entity}.{field}" for entity, fields in _FRAME_ENTITIES.items() for field in fields]
STATE_NAMES = _FRAME_NAMES + [f"prev_{n}" for n in _FRAME_NAMES] + ["goal.x", "goal.y", "goal.z"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]
DEFAULT_CAMERAS = ("corner4",)  # an oblique view of the whole table (corner2 renders upside down)
# Long enough for every scripted expert (the slowest need ~250 steps); MetaWorld's own limit is 500.
DEFAULT_MAX_EPISODE_STEPS = 300


def metaworld_task_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def _task_class(name: str):
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    except ImportError as e:
        raise ImportError("MetaWorld tasks need the metaworld extra: pip install -e '.[metaworld]'.") from e
    if name not in ALL_V3_ENVIRONMENTS:
        raise ValueError(
            f"Unknown MetaWorld task {name!r}: use a v3 task name such as push-v3 "
            f"(available: {', '.join(sorted(ALL_V3_ENVIRONMENTS))})."
        )
    return ALL_V3_ENVIRONMENTS[name]


class MetaWorldTask(gym.Env):
    """One MetaWorld v3 task, goal observable, reseedable, terminated on success."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        name: str,
        *,
        images: bool | Sequence[str] = False,
        image_size: int = 96,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ):
        self._env = _task_class(name)()
        env = self._env
        # Goal-observable, freshly randomized object and goal positions at every reset.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        if "sawyer_observation_space" in env.__dict__:
            del env.sawyer_observation_space  # a cached_property computed for the partially observable case
        env.max_path_length = 10**9  # we count steps ourselves (MetaWorld raises past its own limit)
        self.task_name = name
        self.max_episode_steps = max_episode_steps or DEFAULT_MAX_EPISODE_STEPS
        self.render_mode = render_mode
        self.cameras = list(DEFAULT_CAMERAS if images is True else (images or []))
        self.image_size = image_size
        self._renderer = None
        self.fps = int(round(1.0 / (env.frame_skip * env.model.opt.timestep)))
        self.task_description = name.removesuffix("-v3").replace("-", " ")
        self.feature_names = {STATE_KEY: STATE_NAMES, ACTION_KEY: ACTION_NAMES}
        spaces = {STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)}
        for cam in self.cameras:
            spaces[image_key(cam)] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._steps = 0

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {STATE_KEY: state.astype(np.float32)}
        if self.cameras:
            if self._renderer is None:
                self._renderer = OffscreenRenderer(self._env.model, self.image_size, self.image_size)
                self._camera_ids = [self._renderer.camera_id(cam) for cam in self.cameras]
            for cam, cam_id in zip(self.cameras, self._camera_ids):
                obs[image_key(cam)] = self._renderer.render(self._env.data, cam_id)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        self._steps = 0
        state, _ = self._env.reset()
        return self._observation(state), {"success": False}

    def step(self, action: np.ndarray):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        state, reward, _, _, info = self._env.step(action)
        self._steps += 1
        success = bool(info["success"])
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observation(state), float(reward), success, truncated, {"success": success}

    def render(self):
        """A frame for videos: the first observation camera (or the default camera) at observation size."""
        if self._renderer is None:
            self._renderer = OffscreenRenderer(self._env.model, self.image_size, self.image_size)
        return self._renderer.render(self._env.data, self._renderer.camera_id((self.cameras or DEFAULT_CAMERAS)[0]))

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()


def make_metaworld_env(name: str, *, misinstruct: bool = False, **kwargs) -> MetaWorldTask:
    if misinstruct:
        raise ValueError(f"misinstruct needs a task whose instruction names a goal; metaworld/{name} has none "
                         "(metaworld/mt10 and mt50 do).")
    return MetaWorldTask(name, **kwargs)


class MetaWorldExpert:
    """MetaWorld's own scripted policy for the task, acting on `observation.state`.

    `noise` adds Gaussian action noise (std, action units). `sloppy` imitates a poor teleoperator: slowly
    drifting (Ornstein-Uhlenbeck) action noise and occasional pauses, so demonstrations are suboptimal but often
    still succeed.
    """

    def __init__(self, name: str, *, noise: float = 0.0, sloppy: bool = False, seed: int | None = None):
        from metaworld.policies import ENV_POLICY_MAP

        _task_class(name)
        self._policy = ENV_POLICY_MAP[name]()
        self.noise, self.sloppy = noise, sloppy
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)
        self._drift = np.zeros(4)
        self._pause = 0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        action = np.asarray(self._policy.get_action(obs[STATE_KEY].astype(np.float64)), dtype=np.float64)
        if self.sloppy:
            self._drift += 0.3 * (-self._drift) + 0.25 * self._rng.standard_normal(4)
            action = action + self._drift
            if self._pause > 0:
                self._pause -= 1
                action[:3] = 0.0
            elif self._rng.random() < 0.03:
                self._pause = int(self._rng.integers(3, 10))
        if self.noise > 0:
            action = action + self.noise * self._rng.standard_normal(4)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# ---- multi-task sets: metaworld/mt10, metaworld/mt50 ----------------------------------------------------------------

MULTI_TASK_SETS = ("mt10", "mt50")
BENCHMARK_SEED = 0  # the seed of metaworld.MT10 / MT50 whose task variations (50 per task) the sets use
_VARIATIONS: dict[str, dict[str, list[np.ndarray]]] = {}  # set name -> task -> its variations' rand_vec


def multi_task_names(name: str) -> list[str]:
    """The tasks of a multi-task set, in MetaWorld's order."""
    from metaworld.env_dict import MT10_V3, MT50_V3

    return list({"mt10": MT10_V3, "mt50": MT50_V3}[name])


def _variations_cache_path(name: str):
    import os
    from pathlib import Path

    root = os.environ.get("ROBOPOLICY_CACHE") or Path.home() / ".cache" / "robopolicy"
    return Path(root) / "metaworld" / f"{name}_seed{BENCHMARK_SEED}_variations.json"


def task_variations(name: str) -> dict[str, list[np.ndarray]]:
    """Every task's variations (object and goal placements, MetaWorld's `rand_vec`) of `metaworld.MT10(seed=0)`
    (or MT50). Building the benchmark takes ~6 s (MT10) or ~45 s (MT50), so the placements are kept in this process
    and in a JSON file under ~/.cache/robopolicy (or $ROBOPOLICY_CACHE), which every later process reads."""
    if name in _VARIATIONS:
        return _VARIATIONS[name]
    import json
    import os

    path = _variations_cache_path(name)
    tasks = multi_task_names(name)
    variations = None
    try:
        raw = json.loads(path.read_text())
        if sorted(raw) == sorted(tasks):
            variations = {t: [np.asarray(v, dtype=np.float64) for v in raw[t]] for t in tasks}
    except (OSError, ValueError):
        pass
    if variations is None:
        import metaworld

        bench = (metaworld.MT10 if name == "mt10" else metaworld.MT50)(seed=BENCHMARK_SEED)
        variations = {t: [] for t in tasks}
        probes = {}
        for task in bench.train_tasks:  # metaworld's own set_task decodes its task records
            env = probes.get(task.env_name) or probes.setdefault(task.env_name, bench.train_classes[task.env_name]())
            env.set_task(task)
            variations[task.env_name].append(np.array(env._last_rand_vec, dtype=np.float64))
        for env in probes.values():
            env.close()
        try:  # written whole then renamed, so a concurrent reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({t: [v.tolist() for v in vs] for t, vs in variations.items()}))
            os.replace(tmp, path)
        except OSError:
            pass
    _VARIATIONS[name] = variations
    return variations


class MetaWorldMultiTask(gym.Env):
    """MetaWorld's MT10 or MT50 as one language-conditioned problem.

    A reset with seed `s` runs task `s mod n_tasks` (in `multi_task_names` order), so n consecutive seeds, as
    collect and eval use, run every task once: 500 episodes of MT10 are exactly 50 per task. The seed also draws
    one of the task's 50 variations of `metaworld.MT10(seed=0)` (MT50 likewise) and an instruction, one of the
    task's written phrasings (`sim.metaworld_language`); an unseeded reset draws the task too. `goal` is
    `{"task": name}` (the goal field a scripted expert reads and evaluation groups by), `instruction` the text. The
    observation is MetaWorld's 39-d state whatever the task (goal observable), so nothing but the scene and the
    instruction tells the tasks apart. `misinstruct` phrases the instruction of another task than the one success
    checks (`goal_from_instruction(env.instruction)` is that other task). `reset(options={"instruction": text})`
    (deployment on the simulated robot) makes the episode's task the one whose written phrasing `text` is.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, name: str, *, images: bool | Sequence[str] = False, image_size: int = 96,
                 max_episode_steps: int | None = None, render_mode: str | None = None,
                 instruction_template: str | None = None, misinstruct: bool = False):
        from sim.metaworld_language import INSTRUCTIONS

        if name not in MULTI_TASK_SETS:
            raise ValueError(f"Unknown MetaWorld set {name!r}: use one of {', '.join(MULTI_TASK_SETS)}.")
        if instruction_template is not None:
            raise ValueError(f"metaworld/{name} phrases each task with its own written instructions and has no "
                             "instruction fields; drop instruction_template.")
        self.set_name = name
        self.tasks = multi_task_names(name)
        self.goal_fields = {"task": tuple(self.tasks)}
        self.instruction_templates = {t: INSTRUCTIONS[t] for t in self.tasks}
        self.misinstruct = misinstruct
        self._kwargs = dict(images=images, image_size=image_size, max_episode_steps=max_episode_steps,
                            render_mode=render_mode)
        # built (or read from the cache file) here, so a command's probe env writes the file its workers then read
        self.variations = task_variations(name)
        self._envs: dict[str, MetaWorldTask] = {}
        first = self._task_env(self.tasks[0])
        self.observation_space, self.action_space = first.observation_space, first.action_space
        self.feature_names, self.fps, self.cameras = first.feature_names, first.fps, first.cameras
        self.max_episode_steps, self.render_mode = first.max_episode_steps, render_mode
        self.task_description = f"MetaWorld {name.upper()}: one of {len(self.tasks)} tasks, named by the instruction"
        self.task_name = self.tasks[0]
        self.goal: dict[str, str] = {"task": self.task_name}
        self.instruction = self.instruction_templates[self.task_name][0]

    def goal_from_instruction(self, text: str) -> dict[str, str]:
        """The goal an instruction names, `{"task": name}`: the task whose written phrasing `text` is (case and
        final punctuation aside), as builtin language tasks read a goal from a person's instruction."""
        key = text.strip().rstrip(".!").lower()
        for task in self.tasks:
            if key in (p.lower() for p in self.instruction_templates[task]):
                return {"task": task}
        raise ValueError(f"The instruction {text!r} is none of metaworld/{self.set_name}'s written phrasings "
                         f"(sim/metaworld_language.py), e.g. {self.instruction_templates[self.tasks[0]][0]!r}.")

    def _task_env(self, task: str) -> MetaWorldTask:
        if task not in self._envs:
            self._envs[task] = MetaWorldTask(task, **self._kwargs)
        return self._envs[task]

    @property
    def current(self) -> MetaWorldTask:
        return self._task_env(self.task_name)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        n = len(self.tasks)
        self.task_name = self.tasks[int(rng.integers(n)) if seed is None else seed % n]  # seeded: balanced
        given = (options or {}).get("instruction")
        if given:
            self.task_name = self.goal_from_instruction(given)["task"]
        variations = self.variations[self.task_name]
        rand_vec = variations[int(rng.integers(len(variations)))]
        named = self.task_name
        if self.misinstruct:
            others = [t for t in self.tasks if t != self.task_name]
            named = others[int(rng.integers(len(others)))]
        phrasings = self.instruction_templates[named]
        self.goal = {"task": self.task_name}
        self.instruction = given or phrasings[int(rng.integers(len(phrasings)))]
        env = self.current
        env._env._last_rand_vec = rand_vec.copy()
        env._env._freeze_rand_vec = True  # this variation's object and goal placement
        return env.reset(seed=None if seed is None else int(rng.integers(2**31)))

    def step(self, action: np.ndarray):
        return self.current.step(action)

    def render(self):
        return self.current.render()

    def close(self):
        for env in self._envs.values():
            env.close()
        self._envs.clear()


class MetaWorldMultiExpert:
    """The scripted expert of a multi-task set: MetaWorld's policy of the episode's task, which it reads from
    `obs["goal"]` (the env's `goal`, handed over by the rollout with instructions on)."""

    def __init__(self, name: str, **kwargs):
        self.tasks = multi_task_names(name)
        self.set_name = name
        self._experts = {t: MetaWorldExpert(t, **kwargs) for t in self.tasks}

    def reset(self, seed: int | None = None) -> None:
        for expert in self._experts.values():
            expert.reset(seed)

    def act(self, obs: dict) -> np.ndarray:
        goal = obs.get("goal")
        if not goal or goal.get("task") not in self._experts:
            raise ValueError(f"The expert of metaworld/{self.set_name} needs the episode's goal ({{'task': name}}) "
                             "in obs['goal']; run it with instructions on (collect does for this task).")
        return self._experts[goal["task"]].act(obs)
