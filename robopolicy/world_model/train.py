"""`robopolicy world-model train`: fit the latent world model to stores, then report its multi-step prediction
error by horizon and its success classifier's accuracy on held-out episodes (report.json + report.png).

The loss of one window (TD-MPC2's, plus a decoder the policies need: they act on states):
    consistency  sum_h rho^h |f_e(z_h, a_h) - sg(encode(s_{h+1}))|^2   each member unrolls its own latents
    decoder      |decode(z) - history|^2 on encoded and on predicted latents
    reward       (reward(z_h, a_h) - r_h)^2, success  BCE(success(z_h, a_h), succeeded_h), on both kinds of z
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robopolicy.config import register_config, setting, to_dict
from robopolicy.world_model.data import Episodes, all_windows, load_episodes, sample_windows
from robopolicy.world_model.model import WorldModel, WorldModelConfig, WorldModelError, save_world_model


@register_config("command", "world_model")
@dataclass(kw_only=True)
class WorldModelTrainConfig:
    """configs/world_model.yaml: `robopolicy world-model train`."""

    data: list[str] = setting(doc="stores to learn from: data=STORE or data=[STORE,STORE] (demonstrations, "
                                  "rollouts, deployment recordings)")
    out: str = setting(doc="the model's folder: model.safetensors, config.json, report.json, report.png")
    overwrite: bool = setting(False, "replace a model already in out")
    steps: int = setting(3000, "gradient steps")
    batch_size: int = setting(256, "windows per step")
    lr: float = setting(1.0e-3, "Adam learning rate")
    holdout: float = setting(0.1, "fraction of episodes held out for the report")
    report_horizon: int = setting(8, "chunk steps of open-loop prediction in the report")
    seed: int = setting(0, "seed of the split, initialization and sampling")
    threads: int = setting(1, "torch CPU threads")
    model: WorldModelConfig = setting(WorldModelConfig(), "the model")


def window_loss(model: WorldModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = model.cfg
    horizon = batch["chunk"].shape[1]
    valid = batch["valid"]  # [B, H+1]
    z_enc = model.encode(batch["state"])  # [B, H+1, L]
    history = (batch["history"] - model.state_mean) / model.state_std  # [B, H+1, To, S]
    # each member unrolls its own latents; the networks then run once on every step together
    z = z_enc[:, 0].expand(cfg.ensemble, *z_enc[:, 0].shape)  # [E, B, L]
    chunks = batch["chunk"].expand(cfg.ensemble, *batch["chunk"].shape)  # [E, B, H, K, A]
    predicted = []
    for h in range(horizon):
        z = model.next_per_member(z, chunks[:, :, h])
        predicted.append(z)
    predicted = torch.stack(predicted, 2)  # [E, B, H, L]: the latents of steps 1..H
    w = cfg.rho ** torch.arange(horizon, dtype=torch.float32)  # [H]
    here, there = valid[:, :-1] * w, valid[:, 1:] * w  # [B, H] weighted masks of steps 0..H-1 and 1..H

    def mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # err [..., B, H] over the weighted mask
        return (err * mask).sum() / (mask.sum() * (err.numel() // mask.numel())).clamp_min(1e-8)

    consistency = mean(((predicted - z_enc[:, 1:].detach()) ** 2).mean(-1), there)
    decoder = ((((model.decode_normalized(z_enc[:, 0]) - history[:, 0]) ** 2).mean((-1, -2)) * valid[:, 0]).sum()
               / valid[:, 0].sum().clamp_min(1)
               + w.sum() * mean(((model.decode_normalized(one_member(predicted)) - history[:, 1:]) ** 2
                                 ).mean((-1, -2)), there)
               ) / (1 + w.sum())
    # reward and success heads on the encoded latents of steps 0..H-1 and on the members' mean predicted ones
    latents = torch.stack([z_enc[:, :-1], torch.cat([z_enc[:, :1], predicted[:, :, :-1].mean(0)], 1)])  # [2,B,H,L]
    pair = batch["chunk"].expand(2, *batch["chunk"].shape)
    reward_loss = mean(((model.reward(latents, pair) - batch["reward"]) / model.reward_std) ** 2, here)
    success_loss = mean(F.binary_cross_entropy_with_logits(model.success_logit(latents, pair),
                                                           batch["success"].expand(2, *batch["success"].shape),
                                                           reduction="none"), here)
    loss = consistency + decoder + cfg.reward_weight * reward_loss + cfg.success_weight * success_loss
    return loss, {"loss": loss.item(), "consistency": consistency.item(), "decoder": decoder.item(),
                  "reward": reward_loss.item(), "success": success_loss.item()}


def one_member(latents: torch.Tensor) -> torch.Tensor:
    """[E, B, ...] -> [B, ...]: a random member's latents for each window. The members stay close (their
    disagreement is a few percent of the latents' scale), so decoding one of them per window teaches the decoder
    their latents at a fifth of the cost of decoding all."""
    member = torch.randint(latents.shape[0], (latents.shape[1],))
    return latents[member, torch.arange(latents.shape[1])]


def new_model(cfg: WorldModelConfig, episodes: Episodes) -> WorldModel:
    model = WorldModel(cfg, episodes.state.shape[1], episodes.action.shape[1])
    windows = all_windows(episodes, 1, cfg.chunk_steps, cfg.obs_steps)
    model.set_normalization(torch.from_numpy(episodes.state), torch.from_numpy(episodes.action),
                            windows["reward"][:, 0])
    return model


def fit(model: WorldModel, episodes: Episodes, steps: int, *, batch_size: int = 256, lr: float = 1e-3,
        seed: int = 0, progress=None) -> list[dict[str, float]]:
    """Gradient steps on windows of `episodes` (a new model, or one retrained on grown data); the loss curve."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    model.train().requires_grad_(True)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(steps, 1), eta_min=lr * 0.1)
    curve = []
    for step in range(steps):
        batch = sample_windows(episodes, batch_size, cfg.horizon, cfg.chunk_steps, cfg.obs_steps, rng)
        loss, metrics = window_loss(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optim.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append({"step": step, **{k: round(v, 5) for k, v in metrics.items()}})
        if progress is not None:
            progress.update(1)
    return curve


@torch.no_grad()
def prediction_report(model: WorldModel, episodes: Episodes, horizon: int) -> dict[str, Any]:
    """Open-loop prediction from every held-out frame with the recorded actions: state RMSE (normalized units; per
    state dimension in robot units) and latent error per chunk step (ensemble mean and per member), and the same
    RMSE of decode(encode(state)) with no step predicted (what the latent loses by itself, apart from drift); the
    success classifier at the encoded latents."""
    model.eval()
    cfg = model.cfg
    w = all_windows(episodes, horizon, cfg.chunk_steps, cfg.obs_steps)
    z_enc = model.encode(w["state"])  # [B, H+1, L]
    z = z_enc[:, 0].expand(cfg.ensemble, *z_enc[:, 0].shape)
    by_horizon = []
    for h in range(horizon):
        z = model.next_per_member(z, w["chunk"][:, h].expand(cfg.ensemble, *w["chunk"][:, h].shape))
        there = w["valid"][:, h + 1].bool()
        if not there.any():
            break
        truth = (w["state"][there, h + 1] - model.state_mean) / model.state_std
        predicted = (model.decode(z[:, there])[..., -1, :] - model.state_mean) / model.state_std  # [E, n, S]
        member_rmse = ((predicted - truth) ** 2).mean((-1, -2)).sqrt()
        mean_rmse = ((predicted.mean(0) - truth) ** 2).mean().sqrt()
        dim_rmse = ((predicted.mean(0) - truth) ** 2).mean(0).sqrt() * model.state_std
        by_horizon.append({"chunk_steps": h + 1, "env_steps": (h + 1) * cfg.chunk_steps, "windows": int(there.sum()),
                           "state_rmse": round(mean_rmse.item(), 4),
                           "state_rmse_members": [round(v, 4) for v in member_rmse.tolist()],
                           "state_rmse_by_dim": [round(v, 4) for v in dim_rmse.tolist()],
                           "latent_mse": round(((z[:, there] - z_enc[there, h + 1]) ** 2).mean().item(), 5),
                           "disagreement": round(z[:, there].std(0).mean().item(), 5)})
    here = w["valid"][:, 0].bool()
    decoded = (model.decode(z_enc[here, 0])[..., -1, :] - model.state_mean) / model.state_std
    err = decoded - (w["state"][here, 0] - model.state_mean) / model.state_std
    reconstruction = {"state_rmse": round((err ** 2).mean().sqrt().item(), 4),
                      "state_rmse_by_dim": [round(v, 4) for v in ((err ** 2).mean(0).sqrt() * model.state_std).tolist()]}
    prob = model.success(z_enc[here, 0], w["chunk"][here, 0])
    label = w["success"][here, 0].bool()
    guess = prob > 0.5
    positives, negatives = label.sum().item(), (~label).sum().item()
    recall = (guess & label).sum().item() / max(positives, 1)
    specificity = (~guess & ~label).sum().item() / max(negatives, 1)
    return {"episodes": episodes.num_episodes, "reconstruction": reconstruction, "by_horizon": by_horizon,
            "success_classifier": {"chunks": int(here.sum()), "positives": int(positives),
                                   "accuracy": round((guess == label).float().mean().item(), 4),
                                   "balanced_accuracy": round((recall + specificity) / 2, 4),
                                   "recall": round(recall, 4), "precision": round(
                                       (guess & label).sum().item() / max(guess.sum().item(), 1), 4)}}


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["by_horizon"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["env_steps"] for r in rows]
    ax1.plot(x, [r["state_rmse"] for r in rows], marker="o", label="ensemble mean")
    for e in range(len(rows[0]["state_rmse_members"]) if rows else 0):
        ax1.plot(x, [r["state_rmse_members"][e] for r in rows], alpha=0.3, linewidth=1, color="gray",
                 label="members" if e == 0 else None)
    ax1.set(xlabel="env steps predicted open loop", ylabel="state RMSE (normalized units)",
            title="held-out multi-step prediction")
    ax1.legend(fontsize=8)
    ax2.plot(x, [r["latent_mse"] for r in rows], marker="o", label="latent MSE")
    ax2.plot(x, [r["disagreement"] for r in rows], marker="s", label="ensemble disagreement (std)")
    sc = report["success_classifier"]
    ax2.set(xlabel="env steps predicted open loop", title=f"success classifier: accuracy {sc['accuracy']:.3f}, "
                                                          f"balanced {sc['balanced_accuracy']:.3f}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_episodes(episodes: Episodes, holdout: float, seed: int) -> tuple[Episodes, Episodes | None]:
    n = episodes.num_episodes
    n_held = int(round(holdout * n)) if n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    if n_held == 0:
        return episodes, None
    return episodes.subset(np.sort(order[n_held:])), episodes.subset(np.sort(order[:n_held]))


def train_world_model(cfg: WorldModelTrainConfig, *, log: Callable[[str], None] = print, progress=None
                      ) -> dict[str, Any]:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise WorldModelError(f"{out} already holds something: pass overwrite=true or another out=.")
    if cfg.steps < 1 or not 0 <= cfg.holdout < 1:
        raise WorldModelError(f"steps must be at least 1 and holdout in [0, 1), got steps={cfg.steps}, "
                              f"holdout={cfg.holdout}.")
    episodes, features = load_episodes(cfg.data)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_part, held = split_episodes(episodes, cfg.holdout, cfg.seed)
    model = new_model(cfg.model, train_part)
    log(f"world model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{train_part.num_episodes} episodes ({len(train_part.state)} frames) for training, "
        f"{0 if held is None else held.num_episodes} held out")
    started, load, cpu = time.perf_counter(), os.getloadavg()[0], _cpu_seconds()
    curve = fit(model, train_part, cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                progress=progress)
    train_seconds = round(time.perf_counter() - started, 1)
    report = prediction_report(model, held if held is not None else train_part, cfg.report_horizon)
    report["on"] = "held-out episodes" if held is not None else "training episodes (holdout=0)"
    if out.exists():
        shutil.rmtree(out)
    save_world_model(out, model, features, extra={
        "data": [str(p) for p in cfg.data], "episodes": episodes.num_episodes, "frames": len(episodes.state),
        "steps": cfg.steps, "train": to_dict(cfg)})
    summary = {"command": "world-model train", "out": str(out), "data": [str(p) for p in cfg.data],
               "episodes": episodes.num_episodes, "frames": int(len(episodes.state)), "steps": cfg.steps,
               "train_seconds": train_seconds, "train_cpu_seconds": round(_cpu_seconds() - cpu, 1),
               "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
               "final_loss": curve[-1], "report": report}
    (out / "report.json").write_text(json.dumps({**summary, "loss_curve": curve}, indent=1))
    plot_report(report, out / "report.png")
    summary.update(report_json=str(out / "report.json"), report_png=str(out / "report.png"))
    return summary


def _cpu_seconds() -> float:
    """This process's CPU seconds (the machine may be shared: wall-clock alone says little)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime
