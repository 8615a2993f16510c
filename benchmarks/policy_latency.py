"""Action-chunk latency at batch size 1 for flow, diffusion and vla policies (shipped configs, random weights).

    .venv/bin/python benchmarks/policy_latency.py --threads 1 --calls 200
    .venv/bin/python benchmarks/policy_latency.py --policies vla     # also its uncached prefix, side by side

A language policy (vla) gets an instruction with every call (its text encoding is cached per instruction, as in a
rollout); for it the uncached path (prefix keys/values recomputed at every flow step) is measured beside the
cached one, and the largest difference between their chunks is recorded.

Cases: state-only (40-d state, 4-d action) and one 96x96 camera + state. Reports wall-clock medians and the
process CPU time per call (the cost with a core to itself; wall time on a shared machine is inflated by load,
also recorded). Prints one JSON object as the last line and writes benchmarks/results/policy_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from robopolicy.policies import make_policy

ROOT = Path(__file__).resolve().parents[1]
STATE_DIM, ACTION_DIM, IMAGE_SIZE = 40, 4, 96


def features(with_image: bool) -> dict:
    out = {"observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
           "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None}}
    if with_image:
        out["observation.images.front"] = {"dtype": "uint8", "shape": [IMAGE_SIZE, IMAGE_SIZE, 3], "names": None}
    return out


def stats(feats: dict) -> dict:
    result = {}
    for key, spec in feats.items():
        dims = 3 if key.startswith("observation.images.") else spec["shape"][0]
        result[key] = {"mean": np.zeros(dims), "std": np.ones(dims), "min": -np.ones(dims), "max": np.ones(dims)}
    return result


def measure(config_name: str, with_image: bool, calls: int, warmup: int, kv_cache: bool = True) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "policy" / f"{config_name}.yaml").read_text())
    feats = features(with_image)
    policy = make_policy(cfg, feats, stats(feats)).eval()
    obs = {"observation.state": torch.randn(1, policy.n_obs_steps, STATE_DIM)}
    if with_image:
        obs["observation.images.front"] = torch.randint(0, 256, (1, policy.n_obs_steps, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                        dtype=torch.uint8)
    extra = {}
    if policy.language:
        obs["task"] = ["pick up the red cube and place it on the yellow pad"]
        noise = torch.randn(1, *policy.noise_shape)
        policy.kv_cache = False
        uncached = policy.sample_chunk(obs, noise)
        policy.kv_cache = True
        extra["cached_vs_uncached_max_abs"] = float((policy.sample_chunk(obs, noise) - uncached).abs().max())
        policy.kv_cache = kv_cache
        extra["kv_cache"] = kv_cache
    for _ in range(warmup):
        policy.sample_chunk(obs)
    times, cpu_times = [], []
    for _ in range(calls):
        start, cpu_start = time.perf_counter(), time.process_time()
        policy.sample_chunk(obs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    ms, cpu_ms = np.array(times) * 1e3, np.array(cpu_times) * 1e3
    return {"policy": config_name, "obs": "state+image96" if with_image else "state",
            "params": sum(p.numel() for p in policy.parameters()),
            "inference_steps": int(cfg.get("num_inference_steps", 0)),
            "median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            # CPU time of this process: what the call costs when it has a core to itself (robust to load)
            "cpu_median_ms": round(float(np.median(cpu_ms)), 3), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--policies", nargs="+", default=["flow", "diffusion"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, with_image, args.calls, args.warmup)
               for name in args.policies for with_image in (False, True)]
    if "vla" in args.policies:
        results.append(measure("vla", True, args.calls, args.warmup, kv_cache=False))
    for row in results:
        cache = {True: " (kv cache)", False: " (uncached)"}.get(row.get("kv_cache"), "")
        print(f"{row['policy'] + cache:>22} {row['obs']:>14}: median {row['median_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f} ms  "
              f"cpu median {row['cpu_median_ms']:7.2f} ms")
    # The machine may be shared: the load average says how much the medians are inflated by other work.
    summary = {"benchmark": "policy_latency", "batch_size": 1, "threads": args.threads, "calls": args.calls,
               "load_avg_1min": round(os.getloadavg()[0], 2),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "targets_ms": {"flow/state": 2.0, "flow/state+image96": 15.0, "vla/state+image96": 15.0}, "results": results}
    out = ROOT / "benchmarks" / "results" / "policy_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
