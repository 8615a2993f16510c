"""Built-in task throughput: raw physics vs one env vs a 2-worker vector env, measured side by side.

For each task, the same seeded random action sequence (50-step episodes) drives
  - one env (control steps/s, Python overhead included: IK, observation, reward),
  - raw `mj_step` replaying exactly the joint/gripper controls that env produced from the same episode
    start states (identical physics, no Python around it), reported in control steps/s (physics steps/s
    divided by the substep count),
  - a 2-worker AsyncVectorEnv (total env steps/s across workers, each worker gets the same actions),
  - for reference, 2 independent processes each stepping its own env at once (no IPC): the most any
    2-worker setup can reach on this machine at that moment, since other jobs may hold the cores.
The three are timed in turn inside each repeat, and each number is the best of --repeats, since a shared
machine only ever slows a run down; the load average before and after is recorded with the results.
With --images every env also renders its default camera, so raw physics is then only a reference.
Prints one JSON object as the last line and writes benchmarks/results/sim_throughput.json
(sim_throughput_images.json with --images).

    .venv/bin/python benchmarks/sim_throughput.py --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import mujoco
import numpy as np

from sim import make_env
from sim.builtin import BUILTIN_TASKS
from sim.vector import make_vector_env

RESULTS = Path(__file__).parent / "results" / "sim_throughput.json"
EPISODE_STEPS = 50  # fixed-length episodes: the env run and the raw replay cut episodes at the same steps
NUM_ENVS = 2
STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION


def time_single(env, actions: np.ndarray) -> tuple[float, list]:
    """Env control steps/s, and the replay log: (episode start state, controls applied) per episode."""
    base = env.unwrapped
    ctrls = np.empty((len(actions), base.model.nu))
    start_state = np.empty(mujoco.mj_stateSize(base.model, STATE_SPEC))
    env.reset(seed=0)
    mujoco.mj_getState(base.model, base.data, start_state, STATE_SPEC)
    starts, begins = [start_state.copy()], [0]
    t0 = time.perf_counter()
    for i, action in enumerate(actions):
        _, _, terminated, truncated, _ = env.step(action)
        ctrls[i] = base.data.ctrl  # a small copy; the raw loop pays the same to write it back
        if terminated or truncated:
            env.reset()
            mujoco.mj_getState(base.model, base.data, start_state, STATE_SPEC)  # ~1 us, once per episode
            starts.append(start_state.copy())
            begins.append(i + 1)
    elapsed = time.perf_counter() - t0
    ends = begins[1:] + [len(actions)]
    return len(actions) / elapsed, [(s, ctrls[b:e]) for s, b, e in zip(starts, begins, ends)]


def time_raw(model: mujoco.MjModel, substeps: int, log: list) -> float:
    """Control steps/s of bare mj_step replaying the env's controls from its episode start states."""
    data = mujoco.MjData(model)
    n = sum(len(ctrls) for _, ctrls in log)
    t0 = time.perf_counter()
    for state, ctrls in log:
        mujoco.mj_setState(model, data, state, STATE_SPEC)
        for ctrl in ctrls:
            data.ctrl[:] = ctrl
            mujoco.mj_step(model, data, nstep=substeps)
    return n / (time.perf_counter() - t0)


def time_vector(envs, batched_actions: np.ndarray) -> float:
    """Total env steps/s of a vector env over `batched_actions` [T, num_envs, A]."""
    envs.reset(seed=0)
    t0 = time.perf_counter()
    for action in batched_actions:
        envs.step(action)
    return batched_actions.shape[0] * batched_actions.shape[1] / (time.perf_counter() - t0)


def _independent_run(task: str, actions: np.ndarray, images: bool, barrier, results) -> None:
    env = make_env(task, max_episode_steps=EPISODE_STEPS, images=images)
    env.reset(seed=0)
    barrier.wait()
    results.put(time_single(env, actions)[0])


def time_independent(task: str, actions: np.ndarray, images: bool) -> float:
    """Total steps/s of NUM_ENVS separate processes stepping their own env at once, with no IPC: the
    ceiling for any vector env on this machine at this moment (low when other jobs hold the cores)."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    barrier, results = ctx.Barrier(NUM_ENVS), ctx.Queue()
    procs = [
        ctx.Process(target=_independent_run, args=(task, actions, images, barrier, results))
        for _ in range(NUM_ENVS)
    ]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return total


def benchmark_task(name: str, steps: int, repeats: int, images: bool) -> dict:
    task = f"builtin/{name}"
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, 4)).astype(np.float32)
    batched = np.repeat(actions[:, None], NUM_ENVS, axis=1)  # [T, num_envs, A]
    env = make_env(task, max_episode_steps=EPISODE_STEPS, images=images)
    envs = make_vector_env(task, NUM_ENVS, max_episode_steps=EPISODE_STEPS, images=images)
    time_vector(envs, batched[:20])  # warm-up: workers started and imported
    single = raw = vector = independent = 0.0
    for _ in range(repeats):
        single_now, log = time_single(env, actions)
        single = max(single, single_now)
        raw = max(raw, time_raw(env.unwrapped.model, env.unwrapped.substeps, log))
        vector = max(vector, time_vector(envs, batched))
        independent = max(independent, time_independent(task, actions, images))
    env.close()
    envs.close()
    substeps = env.unwrapped.substeps
    return {
        "substeps": substeps,
        "raw_mj_step_per_s": round(raw * substeps, 1),
        "raw_control_steps_per_s": round(raw, 1),
        "single_env_steps_per_s": round(single, 1),
        "vector2_env_steps_per_s": round(vector, 1),
        "single_over_raw": round(single / raw, 3),
        "vector2_over_single": round(vector / single, 3),
        "two_processes_env_steps_per_s": round(independent, 1),
        "two_processes_over_single": round(independent / single, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="control steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many timed runs")
    parser.add_argument("--tasks", nargs="*", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--images", action="store_true", help="envs also render their default camera (96x96)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {RESULTS} (..._images.json with --images)"
    )
    args = parser.parse_args()
    out = args.out or (RESULTS.with_name("sim_throughput_images.json") if args.images else RESULTS)

    results: dict = {
        "benchmark": "sim_throughput",
        "images": args.images,
        "steps": args.steps,
        "repeats": args.repeats,
        "actions": f"uniform random in [-1, 1] (seed 0), episodes of {EPISODE_STEPS} steps",
        "cpu_count": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "mujoco": mujoco.__version__,
        "python": platform.python_version(),
        "tasks": {},
    }
    for name in args.tasks:
        results["tasks"][name] = benchmark_task(name, args.steps, args.repeats, args.images)
        print(f"{name}: {results['tasks'][name]}", flush=True)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
