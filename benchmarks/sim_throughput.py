"""Built-in task throughput: raw physics vs one env vs vector envs on 2 workers, measured side by side.

For each task, the same seeded random action sequence (50-step episodes) drives
  - one env (control steps/s, Python overhead included: IK, observation, reward),
  - raw `mj_step` replaying exactly the joint/gripper controls that env produced from the same episode
    start states (identical physics, no Python around it), reported in control steps/s (physics steps/s
    divided by the substep count),
  - gymnasium's AsyncVectorEnv with 2 envs (one process each, shared-memory observations), for reference,
  - ours (`sim.vector.SharedMemoryVectorEnv`) with 2 workers x k envs for each --envs-per-worker k,
    (total env steps/s; every env replays the same actions, about --steps env steps per timed run),
  - 2 independent processes each stepping its own env at once (no IPC): the most any 2-worker setup can
    reach on this machine at that moment, since other jobs may hold the cores.
All of them are timed in turn inside each repeat and each number is the best of --repeats, since a shared
machine only ever slows a run down; the load average (as `uptime` shows it) before and after each task is
recorded with the results. With --images every env also renders its default camera, so raw physics is then
only a reference. Prints one JSON object as the last line and writes benchmarks/results/sim_throughput.json
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
from functools import partial
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

from sim import make_env
from sim.builtin import BUILTIN_TASKS
from sim.vector import SharedMemoryVectorEnv

RESULTS = Path(__file__).parent / "results" / "sim_throughput.json"
EPISODE_STEPS = 50  # fixed-length episodes: the env run and the raw replay cut episodes at the same steps
NUM_WORKERS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGET = 1.6  # the bar: vectorized on 2 workers at least 1.6x the single env's steps/s
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


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by this process and the processes `pids` (Linux /proc)."""
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return total


def worker_pids(envs: gym.vector.VectorEnv) -> list[int]:
    return envs.worker_pids if isinstance(envs, SharedMemoryVectorEnv) else [p.pid for p in envs.processes]


def time_vector(envs: gym.vector.VectorEnv, actions: np.ndarray) -> tuple[float, float]:
    """Total env steps/s of a vector env, every env replaying `actions` [T, A] for T / num_envs steps, and
    the CPU seconds per env step that it cost in all its processes."""
    batched = np.repeat(actions[: max(1, len(actions) // envs.num_envs), None], envs.num_envs, axis=1)
    envs.reset(seed=0)
    pids = worker_pids(envs)
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    for action in batched:  # [num_envs, A]
        envs.step(action)
    elapsed, steps = time.perf_counter() - t0, batched.shape[0] * batched.shape[1]
    return steps / elapsed, (cpu_seconds(pids) - cpu0) / steps


def _independent_run(task: str, actions: np.ndarray, images: bool, barrier, results) -> None:
    env = make_env(task, max_episode_steps=EPISODE_STEPS, images=images)
    env.reset(seed=0)
    barrier.wait()
    results.put(time_single(env, actions)[0])


def time_independent(task: str, actions: np.ndarray, images: bool) -> float:
    """Total steps/s of NUM_WORKERS separate processes stepping their own env at once, with no IPC: the
    ceiling for any vector env on this machine at this moment (low when other jobs hold the cores)."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    barrier, results = ctx.Barrier(NUM_WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=_independent_run, args=(task, actions, images, barrier, results))
        for _ in range(NUM_WORKERS)
    ]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return total


def benchmark_task(name: str, steps: int, repeats: int, images: bool, envs_per_worker: list[int]) -> dict:
    task = f"builtin/{name}"
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, 4)).astype(np.float32)
    env_fn = partial(make_env, task, max_episode_steps=EPISODE_STEPS, images=images)
    env = env_fn()
    context = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    vectors: dict[str, gym.vector.VectorEnv] = {
        "gym_async_2": gym.vector.AsyncVectorEnv([env_fn] * NUM_WORKERS, shared_memory=True, context=context,
                                                 autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    }
    for k in envs_per_worker:
        vectors[f"ours_2x{k}"] = SharedMemoryVectorEnv(env_fn, NUM_WORKERS * k, num_workers=NUM_WORKERS, name=task)
    load_before = round(os.getloadavg()[0], 2)
    for envs in vectors.values():
        time_vector(envs, actions[:40])  # warm-up: workers started and imported
    best = dict.fromkeys(["single", "raw", "two_processes", *vectors], 0.0)
    cpu = dict.fromkeys(["single", *vectors], np.inf)  # CPU seconds per env step, the least seen
    for _ in range(repeats):
        cpu0 = time.process_time()
        single_now, log = time_single(env, actions)
        cpu["single"] = min(cpu["single"], (time.process_time() - cpu0) / len(actions))
        best["single"] = max(best["single"], single_now)
        best["raw"] = max(best["raw"], time_raw(env.unwrapped.model, env.unwrapped.substeps, log))
        for label, envs in vectors.items():
            rate, cpu_per_step = time_vector(envs, actions)
            best[label], cpu[label] = max(best[label], rate), min(cpu[label], cpu_per_step)
        best["two_processes"] = max(best["two_processes"], time_independent(task, actions, images))
    for envs in vectors.values():
        envs.close()
    substeps = env.unwrapped.substeps
    env.close()
    single = best["single"]
    result = {
        "substeps": substeps,
        "load_average_before": load_before,
        "load_average_after": round(os.getloadavg()[0], 2),
        "raw_mj_step_per_s": round(best["raw"] * substeps, 1),
        "raw_control_steps_per_s": round(best["raw"], 1),
        "single_env_steps_per_s": round(single, 1),
        "single_over_raw": round(single / best["raw"], 3),
        "single_cpu_us_per_env_step": round(cpu["single"] * 1e6, 1),
    }
    for label in [*vectors, "two_processes"]:
        result[f"{label}_env_steps_per_s"] = round(best[label], 1)
        result[f"{label}_over_single"] = round(best[label] / single, 3)
        if label in cpu:
            # CPU time is what other jobs on the cores do not change much: with 2 free cores the vector env
            # could reach at most 2 x single x (single's CPU per step / its CPU per step)
            result[f"{label}_cpu_us_per_env_step"] = round(cpu[label] * 1e6, 1)
            result[f"{label}_free_2_cores_bound_over_single"] = round(NUM_WORKERS * cpu["single"] / cpu[label], 3)
    ours = max((label for label in vectors if label.startswith("ours")), key=best.__getitem__)
    result["best_ours"] = ours
    result["best_ours_over_gym_async_2"] = round(best[ours] / best["gym_async_2"], 3)
    # the share of what 2 cores give at this moment (the ceiling falls below 1.6x when other jobs hold them)
    result["best_ours_over_two_processes"] = round(best[ours] / best["two_processes"], 3)
    result["gym_async_2_over_two_processes"] = round(best["gym_async_2"] / best["two_processes"], 3)
    result["meets_target"] = bool(best[ours] / single >= TARGET)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="control steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many timed runs")
    parser.add_argument("--tasks", nargs="*", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--envs-per-worker", type=int, nargs="*", default=[1, 4, 8],
                        help="k for our vector env with 2 workers x k envs")
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
        "workers": NUM_WORKERS,
        "target": f"a vector env on {NUM_WORKERS} workers at least {TARGET}x the single env's steps/s",
        "cpu_count": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "mujoco": mujoco.__version__,
        "python": platform.python_version(),
        "tasks": {},
    }
    for name in args.tasks:
        results["tasks"][name] = benchmark_task(name, args.steps, args.repeats, args.images, args.envs_per_worker)
        print(f"{name}: {results['tasks'][name]}", flush=True)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
