"""The typed configs of the small commands: `collect`, `data`, `eval` and `quickstart` (train's is in train.py).

Each mirrors its `configs/<command>.yaml` field for field (tests/test_config_registry.py checks that they agree);
`robopolicy COMMAND --help` prints them with their docs. Standard library and numpy only (`RolloutConfig` comes
with the rollouts), so `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from robopolicy.config import register_config, setting
from robopolicy.rollout import RolloutConfig


@dataclass(kw_only=True)
class ExpertConfig:
    noise: float = setting(0.0, "Gaussian action noise (std, in action units)")
    sloppy: bool = setting(False, "suboptimal but often successful demonstrations")
    dart: float | None = setting(None, "DART: execute the expert's action plus this Gaussian std, record the clean "
                                       "action; null: the task's default (0.15 for push_two_ways, else 0)")


@dataclass(kw_only=True)
class ObsConfig:
    images: bool = setting(False, "true: the task's default cameras")
    cameras: list[str] | None = setting(None, "with images=true, these cameras, e.g. [front, wrist]")
    image_size: int = setting(96, "image height and width in pixels")


@register_config("command", "collect")
@dataclass(kw_only=True)
class CollectConfig:
    task: str = setting("builtin/pick_place", "builtin/<reach|push|pick_place|push_two_ways|pick_color>, "
                                              "metaworld/<v3 task>")
    episodes: int = setting(50, "episodes to record")
    out: str = setting(doc="the store (a folder); appended to when it exists with the same features")
    overwrite: bool = setting(False, "replace an existing store at out")
    seed: int = setting(0, "episode k runs with seed seed+k")
    num_envs: int = setting(8, "envs stepped in parallel (spread over one worker process per core)")
    source: str = setting("expert", "recorded per episode", choices=("expert", "policy", "human", "intervention"))
    max_episode_steps: int | None = setting(None, "null: the task's default")
    expert: ExpertConfig = setting(ExpertConfig(), "the task's scripted expert")
    obs: ObsConfig = setting(ObsConfig(), "what the store records of each observation")
    rollout: RolloutConfig = setting(RolloutConfig(), "where the envs step (rollout=ray: Ray actors)")
    ckpt: str | None = setting(None, "record a policy checkpoint's rollouts (source: policy) instead of the "
                                     "scripted expert's, e.g. data for a world model")


@register_config("command", "data")
@dataclass(kw_only=True)
class DataConfig:
    store: str | None = setting(None, "the store to read (info, validate, stats, export, quality, filter)")
    format: str = setting("lerobot", "export/import: lerobot (v3.0 written; v3.0 and v2.1 read) | robomimic (import)",
                          choices=("lerobot", "robomimic"))
    src: str | None = setting(None, "import: a LeRobot dataset folder or a robomimic .hdf5 file")
    out: str | None = setting(None, "export: a folder; import/filter: the new store; quality: the report folder")
    overwrite: bool = setting(False, "import/filter: replace an existing store at out")
    video: bool = setting(False, "export: encode camera images as mp4 video instead of PNG images")
    repo_id: str | None = setting(None, "export: the LeRobot repo id in the metadata; null: local/<store name>")
    filter_key: str | None = setting(None, "robomimic import: a mask/<key> demo list, e.g. train")
    min_quality: float = setting(0.5, "filter: keep episodes whose quality weight is at least this")
    episodes: list[int] | None = setting(None, "view: the episodes to show; null: all")
    view_address: str | None = setting(None, "view: a rerun viewer's gRPC URL to stream to instead of the .rrd file "
                                              "out (null: <store>_view.rrd)")


@register_config("command", "eval")
@dataclass(kw_only=True)
class EvalConfig:
    ckpt: str = setting(doc="a checkpoint folder, or a run folder (its checkpoints/last)")
    task: str | None = setting(None, "null: the task the checkpoint was trained for")
    episodes: int = setting(100, "evaluation episodes")
    num_envs: int = setting(8, "envs stepped in parallel (one worker process per core); the same episodes and "
                               "noises whatever it is, up to a batch's float rounding (compare at one num_envs)")
    seed: int = setting(100000, "episode k runs with seed seed+k (collection uses 0, 1, ...: unseen episodes)")
    out: str | None = setting(None, "folder for summary.json and videos; null: <ckpt>/eval_<task>")
    videos: int = setting(0, "number of episodes saved as videos (image tasks)")
    max_episode_steps: int | None = setting(None, "null: the task's default")
    num_inference_steps: int | None = setting(None, "flow/diffusion: replace the checkpoint's sampler step count")
    threads: int | None = setting(1, "torch CPU threads for the policy (null: torch's default)")
    guidance: str | None = setting(None, "value: with a value_guided checkpoint, run the best of n_samples chunks; "
                                         "none: its base alone", choices=(None, "value", "none"))
    n_samples: int | None = setting(None, "guidance=value: candidate chunks per decision; null: the checkpoint's")
    instruction_template: str | None = setting(None, "language tasks: phrase every instruction with this template "
                                                     "over the task's goal fields, e.g. 'go {side} of the wall'")
    misinstruct: bool = setting(False, "language tasks: instruct another valid goal than the one success checks")
    tasks: list[str] | None = setting(None, "several tasks in one evaluation (success per task and the mean); "
                                            "replaces task")
    rollout: RolloutConfig = setting(RolloutConfig(), "where the envs step (rollout=ray: Ray actors)")
    wm: str | None = setting(None, "a world model folder (`robopolicy world-model train`): predict the success rate "
                                   "by imagined rollouts instead of simulating")
    wm_starts: str = setting("env", "with wm: the start states: env: the evaluation seeds' resets (no simulator "
                                    "step) | store: the first states of the model's training episodes",
                             choices=("env", "store"))


@dataclass(kw_only=True)
class QuickstartRefineConfig:
    algo: str = setting("residual", "configs/algo/: residual | steer | steer_na | value_guided")
    base_data: str = setting("sloppy", "the weak base's demonstrations: sloppy (the expert's sloppy mode, as the "
                                       "README's weak bases; collected once beside the store) | expert (the store's)",
                             choices=("sloppy", "expert"))
    base_demos: int = setting(30, "the weak base trains on the first base_demos of those demonstrations ...")
    base_steps: int = setting(1000, "... for base_steps steps")
    env_steps: int = setting(80000, "refinement budget in env steps (0: skip the stage)")
    eval_every: int = setting(10000, "env steps between 20-episode evaluations (the curve in refine/curves.png)")
    eval_episodes: int = setting(100, "episodes evaluating the base and the refined policy, on the same seeds")
    finetune: list[str] = setting([], "more `robopolicy finetune` overrides (none: finetune derives the reward "
                                      "settings from the task and the base, and prints them)")
    background: bool = setting(True, "run this stage in a second process beside train/eval/deploy (its "
                                     "output goes to <out>/refine.log): on 2 cores the quickstart then takes its "
                                     "longest stage's time, not the sum")


@register_config("command", "quickstart")
@dataclass(kw_only=True)
class QuickstartConfig:
    task: str = setting("builtin/pick_place", "the built-in task of every stage")
    episodes: int = setting(50, "expert demonstrations")
    store: str = setting("datasets/quickstart_pick_place", "the demonstrations (reused when already there)")
    out: str = setting("runs/quickstart", "the run folder, replaced at every quickstart run")
    policy: str = setting("flow", "the policy config trained (configs/policy/)")
    train_steps: int = setting(6000, "training steps")
    eval_episodes: int = setting(100, "evaluation episodes of the trained policy")
    deploy_episodes: int = setting(10, "real-time episodes on the simulated robot through a policy server on "
                                       "loopback (0: skip)")
    seed: int = setting(0, "seed of collection, training and refinement")
    refine: QuickstartRefineConfig = setting(QuickstartRefineConfig(), "online refinement of a deliberately weak "
                                                                       "base, success before and after")
