"""How far can latent steering move a base policy? The spread of its executed actions over the noise it samples.

    .venv/bin/python benchmarks/noise_authority.py --ckpt RUN_A --ckpt RUN_B --store datasets/pick_place

Steering (`algo=steer`) and value-guided selection (`algo=value_guided`) never change the base: they can only pick
among the chunks its sampler makes from different initial noises. A base whose chunk barely depends on the noise
gives them nothing to choose from, whatever the RL does. For each checkpoint this samples `--noises` chunks per
observation (observations from the store's last `--episodes` episodes, every `--stride` frames), with the noise
drawn as steering draws it (standard normal times `--noise-scale`), and reports per action dimension, in the base's
normalized units ([-1, 1] with min_max actions): the standard deviation over noises and the range (max - min),
averaged over observations and executed steps. Compare with the residual's bound (`algo.scale`, same units).
For a base trained with a VIB bottleneck (policy.encoder.bottleneck=vib) it also reports, under `bottleneck`, the
same spread over residuals drawn uniformly from [-latent_scale, latent_scale] on its latent with the sampler noise
held fixed: what bottleneck steering (`algo.latent=bottleneck`) can choose among.
Prints one JSON object as the last line and writes benchmarks/results/noise_authority.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from einops import repeat

from robopolicy.checkpoint import resolve_checkpoint
from robopolicy.data import DemoStore
from robopolicy.loading import load_policy
from robopolicy.rl.task_profile import sample_over_noises, spread

ROOT = Path(__file__).resolve().parents[1]


def store_observations(store: DemoStore, obs_keys: list[str], n_obs_steps: int, episodes: int,
                       stride: int) -> dict[str, torch.Tensor]:
    """Observation histories [B, To, ...] at every `stride`-th frame of the store's last `episodes` episodes."""
    rows: dict[str, list[np.ndarray]] = {k: [] for k in obs_keys}
    for index in range(max(0, store.num_episodes - episodes), store.num_episodes):
        ep = store.get_episode(index)
        length = len(ep["action"])
        for t in range(0, length, stride):
            frames = np.clip(np.arange(t - n_obs_steps + 1, t + 1), 0, length - 1)
            for k in obs_keys:
                rows[k].append(np.asarray(ep[k])[frames])
    return {k: torch.as_tensor(np.stack(v)) for k, v in rows.items()}


def authority(policy, obs: dict[str, torch.Tensor], noises: int, noise_scale: float, seed: int) -> dict:
    return spread(policy, *sample_over_noises(policy, obs, noises, noise_scale, seed))


@torch.no_grad()
def latent_authority(policy, obs: dict[str, torch.Tensor], residuals: int, latent_scale: float, seed: int) -> dict:
    """The spread over uniform residuals on a VIB base's latent, one fixed sampler noise per observation."""
    b = next(iter(obs.values())).shape[0]
    generator = torch.Generator().manual_seed(seed)
    z = repeat(policy.encode(obs), "b f -> (b n) f", n=residuals)
    noise = repeat(torch.randn(b, *policy.noise_shape, generator=generator), "b h a -> (b n) h a", n=residuals)
    residual = latent_scale * (2 * torch.rand(z.shape, generator=generator) - 1)
    return spread(policy, policy.sample_from_features(z + residual, noise), residuals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="a checkpoint or training run (repeatable)")
    parser.add_argument("--store", required=True, help="the store whose observations are used")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--stride", type=int, default=7)
    parser.add_argument("--noises", type=int, default=32)
    parser.add_argument("--noise-scale", type=float, default=1.0, help="steer's noise_scale (1.5 in configs/algo)")
    parser.add_argument("--latent-scale", type=float, default=1.0, help="VIB bases: steer's latent_scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = DemoStore.open(args.store)
    results = {}
    for ckpt in args.ckpt:
        path = resolve_checkpoint(ckpt)
        policy = load_policy(path).eval()
        obs = store_observations(store, policy.obs_keys, policy.n_obs_steps, args.episodes, args.stride)
        results[ckpt] = {"checkpoint": str(path), "policy": policy.name,
                         **authority(policy, obs, args.noises, args.noise_scale, args.seed)}
        if policy.obs_encoder.bottleneck == "vib":
            results[ckpt]["bottleneck"] = latent_authority(policy, obs, args.noises, args.latent_scale, args.seed)
    report = {"benchmark": "noise_authority", "store": args.store, "noises": args.noises,
              "noise_scale": args.noise_scale, "units": "normalized actions", "results": results}
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "noise_authority.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
