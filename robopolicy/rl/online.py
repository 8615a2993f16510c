"""The one online loop every refinement method runs (collect chunked rollouts, update, evaluate periodically) and
its learning curves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.config import setting
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.metrics import success_summary
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import ChunkedCollector, Method, RewardSpec
from robopolicy.rl.ppo import RolloutStore


class Curves:
    """Success rate against env steps: evaluations (95% Wilson interval) and training episodes; JSON and PNG."""

    def __init__(self, out: Path, algo: str, task: str | None):
        self.out, self.algo, self.task = Path(out), algo, task
        self.eval: list[dict[str, Any]] = []
        self.train_episodes: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def add_eval(self, env_steps: int, result: Mapping[str, Any]) -> dict[str, Any]:
        point = {"env_steps": int(env_steps), "success_rate": result["success_rate"],
                 "success_ci95": result["success_ci95"], "episodes": result["episodes"],
                 "mean_return": result["mean_return"], "wall_seconds": round(time.perf_counter() - self.started, 1)}
        self.eval.append(point)
        return point

    def steps_to(self, target: float, min_episodes: int = 0) -> int | None:
        """Env steps of the first evaluation of at least `min_episodes` episodes at or above `target` (None when
        none reached it)."""
        return next((p["env_steps"] for p in self.eval
                     if p["success_rate"] >= target and p["episodes"] >= min_episodes), None)

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = self.out / "curves.json", self.out / "curves.png"
        json_path.write_text(json.dumps({"algo": self.algo, "task": self.task, "eval": self.eval,
                                         "train_episodes": self.train_episodes}, indent=1))
        plot_curves({self.algo: self}, png_path, title=self.task or "")
        return json_path, png_path


def plot_curves(runs: Mapping[str, Curves], path: Path, title: str = "", window: int = 20) -> None:
    """One panel: evaluation success (markers, 95% band) and a moving average of training episode success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, curves in runs.items():
        line = None
        if curves.eval:
            x = [p["env_steps"] for p in curves.eval]
            line, = ax.plot(x, [p["success_rate"] for p in curves.eval], marker="o", label=f"{label} (eval)")
            ax.fill_between(x, [p["success_ci95"][0] for p in curves.eval], [p["success_ci95"][1] for p in curves.eval],
                            alpha=0.15, color=line.get_color())
        if curves.train_episodes:
            ok = np.array([e["success"] for e in curves.train_episodes], dtype=float)
            avg = np.convolve(ok, np.ones(window) / window, mode="valid") if len(ok) >= window else ok.cumsum() / (
                np.arange(len(ok)) + 1)
            steps = [e["env_steps"] for e in curves.train_episodes][len(ok) - len(avg):]
            ax.plot(steps, avg, linestyle=":", color=None if line is None else line.get_color(),
                    label=f"{label} (training, last {window})")
    ax.set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class AlgoConfig:
    """Settings every refinement method has; each method's config (registered as ("algo", name)) extends it."""

    name: str = setting("", "the method (configs/algo/<name>.yaml)")
    hidden: list[int] = setting([256, 256], "hidden widths of the method's networks")
    gamma: float = setting(0.99, "per env step; a chunk of k steps is discounted by gamma ** k")
    lr: float = setting(3.0e-4, "Adam learning rate")
    batch_size: int = setting(256, "transitions per update")
    buffer_size: int = setting(100_000, "chunk-level transitions kept")
    learning_starts: int = setting(2000, "env steps of data before the first update")
    collect_steps: int = setting(16, "env steps between rounds of updates")
    updates_per_step: float = setting(0.25, "gradient updates per env step")


@dataclass
class EvalSchedule:
    """When and how long the online loop evaluates (`robopolicy finetune`'s eval section)."""

    every: int = setting(10_000, "env steps between evaluations (0: none during training)")
    episodes: int = setting(20, "episodes per evaluation during training")
    num_envs: int = setting(2, "evaluation envs (subprocesses)")
    target: float = setting(0.9, "success rate whose first crossing is reported as steps_to_target")
    confirm_episodes: int = setting(100, "a crossing on `episodes` is re-evaluated over this many before it "
                                         "counts (0: no check)")
    stop_at_target: bool = setting(False, "end training at the first evaluation reaching the target")


def run_online(method: Method, buffer: ReplayBuffer | RolloutStore, make_envs: Callable[[int], Any], *,
               algo: AlgoConfig, ev: EvalSchedule, reward: RewardSpec, env_steps: int, num_envs: int, seed: int,
               out: Path, task: str | None = None, log: Callable[[str], None] = print, progress=None
               ) -> dict[str, Any]:
    """Collect chunked rollouts, update the method (off-policy from `buffer`, or on-policy on whole fresh
    episodes), evaluate periodically; returns the summary pieces."""
    total = int(env_steps)
    curves = Curves(out, algo.name, task)
    rng = np.random.default_rng(seed)
    envs, eval_envs = make_envs(num_envs), None
    collector = ChunkedCollector(envs, method, buffer.add, reward, seed=seed)
    collect_steps, updates_per_step = algo.collect_steps, algo.updates_per_step
    batch_size, learning_starts = algo.batch_size, algo.learning_starts
    eval_every, eval_episodes, target = ev.every, ev.episodes, ev.target
    # A short evaluation at or above the target is repeated over confirm_episodes before it counts: 20 episodes
    # on a policy at 0.7 reach 0.9 often enough to report a crossing that 100 episodes do not bear out.
    confirm_episodes = ev.confirm_episodes
    metrics: dict[str, float] = {}
    update_debt, n_updates = 0.0, 0
    next_eval = eval_every if eval_every else None
    reached = False
    try:
        if eval_episodes and eval_every:
            eval_envs = make_envs(ev.num_envs)
            log(f"env steps 0: success {_evaluate(curves, eval_envs, method, eval_episodes, 0):.2f}")
        while collector.env_steps < total and not reached:
            ran = collector.collect(min(collect_steps, total - collector.env_steps))
            if progress is not None:
                progress.update(ran)
            curves.train_episodes = collector.episodes
            if method.on_policy:  # PPO: update on whole fresh episodes, then drop them
                if method.ready():
                    metrics = method.update_rollouts()
                    n_updates += 1
            elif len(buffer) and collector.env_steps >= learning_starts:
                update_debt += ran * updates_per_step
                while update_debt >= 1:
                    metrics = method.update(buffer.sample(batch_size, rng))
                    update_debt -= 1
                    n_updates += 1
            if next_eval is not None and collector.env_steps >= next_eval:
                next_eval += eval_every
                rate = _evaluate(curves, eval_envs, method, eval_episodes, collector.env_steps)
                log(f"env steps {collector.env_steps}: success {rate:.2f}, "
                    + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
                if rate >= target and confirm_episodes > eval_episodes:
                    rate = _evaluate(curves, eval_envs, method, confirm_episodes, collector.env_steps)
                    log(f"env steps {collector.env_steps}: success {rate:.2f} over {confirm_episodes} episodes")
                reached = ev.stop_at_target and rate >= target
                curves.write()
    finally:
        envs.close()
        if eval_envs is not None:
            eval_envs.close()
    curves.train_episodes = collector.episodes
    return {"curves": curves, "env_steps": collector.env_steps, "updates": n_updates, "metrics": metrics,
            "train_success_rate": success_summary([e["success"] for e in collector.episodes[-50:]])["success_rate"]
            if collector.episodes else None}


def _evaluate(curves: Curves, envs, method: Method, episodes: int, env_steps: int) -> float:
    policy = method.policy.eval()
    result = evaluate(envs, policy, episodes, seed=EVAL_SEED)
    return curves.add_eval(env_steps, result)["success_rate"]
