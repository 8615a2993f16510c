"""`robopolicy train`: offline training of an action-chunk policy on a demonstration store, one linear loop.

AdamW with warmup + cosine decay, gradient clipping, an EMA copy of the weights (the one evaluated and saved),
periodic evaluation in vectorized simulation, checkpoints, TensorBoard logs, and exact resume after a kill: the
batch indices and the torch random state of step s are both derived from (seed, s) alone, so a resumed run draws
exactly what the uninterrupted run would have drawn.

`launcher=ddp nproc=N` runs the same loop in N processes (torch.multiprocessing, a gloo group on loopback) with
DistributedDataParallel: each step's batch of `batch_size` windows is drawn as above and split into N contiguous
shards, one per rank, so N ranks take the same windows as one process (with a deterministic loss, the same
gradients); rank r draws its noise from (seed, step, r). Checkpoints, EMA, evaluation and logs are rank 0's; every
rank resumes from the same checkpoint. A rank that dies ends the run with an error; `resume=true` continues it.
`precision=bf16` (autocast) and `compile=true` (torch.compile of the loss) are switches for GPUs that also run,
slower, on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy.checkpoint import point_last, save_checkpoint
from robopolicy.config import register_config, setting, to_dict
from robopolicy.data import DemoStore, WindowDataset
from robopolicy.data.spec import is_image_key, policy_features
from robopolicy.evaluate import evaluate
from robopolicy.policies import make_policy
from robopolicy.train_state import has_train_state, load_train_state, save_train_state


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay; lr, weight_decay and ema_decay null: the policy config's."""

    lr: float | None = setting(None, "null: the policy config's optim.lr")
    weight_decay: float | None = setting(None, "null: the policy config's optim.weight_decay")
    ema_decay: float | None = setting(None, "decay of the EMA weights (the ones evaluated and saved); null: the "
                                            "policy config's optim.ema_decay")
    betas: list[float] = setting([0.95, 0.999], "AdamW's betas")
    warmup_steps: int = setting(100, "linear warmup, then cosine decay to 0 at the last step")
    grad_clip: float = setting(1.0, "largest gradient norm")


@dataclass(kw_only=True)
class TrainEvalConfig:
    every: int = setting(1000, "steps between evaluations during training (0: only at the end)")
    episodes: int = setting(20, "episodes per evaluation during training")
    final_episodes: int = setting(50, "episodes of the evaluation at the end (0: none)")
    num_envs: int = setting(8, "envs stepped in parallel")
    videos: int = setting(2, "rollouts written as videos at the end (image tasks)")


@register_config("command", "train")
@dataclass(kw_only=True)
class TrainConfig:
    """configs/train.yaml without its `policy:` section (the policy's own registered config covers that)."""

    task: str = setting("builtin/pick_place", "the simulated task used for evaluation during and after training")
    data: str = setting(doc="the demonstration store")
    out: str = setting(doc="the run folder: checkpoints/, tensorboard/, curves.png, videos/, summary.json")
    resume: bool = setting(False, "continue the run in out from its last checkpoint (exactly)")
    overwrite: bool = setting(False, "delete a previous run in out and start over")
    seed: int = setting(0, "initial weights, batches and sampling noise all derive from it")
    steps: int = setting(6000, "gradient steps")
    batch_size: int = setting(256, "windows per step")
    only_success: bool = setting(True, "train on the store's successful episodes only")
    max_episodes: int | None = setting(None, "the first N (successful) episodes; null: all")
    use_images: bool | str = setting("auto", "auto: images when the store has them; false: state only",
                                     choices=("auto", True, False))
    quality_weighting: bool = setting(False, "sample windows in proportion to their episode's quality weight")
    threads: int | None = setting(1, "torch CPU threads (null: all cores); 1 is fastest for the small default "
                                     "models on a shared 2-core machine")
    log_every: int = setting(50, "steps between loss records (TensorBoard, curves.png)")
    checkpoint_every: int = setting(1000, "steps between checkpoints (the last step always writes one)")
    keep_checkpoints: int | None = setting(2, "step checkpoints kept on disk, the newest (null: every one)")
    max_episode_steps: int | None = setting(None, "evaluation episodes; null: the task's default")
    launcher: str = setting("none", "none: this process | ddp: nproc processes with DistributedDataParallel "
                                    "(gloo on loopback); batch_size is the total over the ranks",
                            choices=("none", "ddp"))
    nproc: int = setting(2, "launcher=ddp: ranks (processes), each with `threads` torch threads")
    precision: str = setting("fp32", "bf16: autocast the loss to bfloat16 (for GPUs; on a CPU slower)",
                             choices=("fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the loss (for GPUs; on a CPU its compile takes minutes)")
    optim: OptimConfig = setting(OptimConfig(), "null values: the policy config's optim section")
    eval: TrainEvalConfig = setting(TrainEvalConfig(), "evaluation in simulation during and after training")


class TrainError(ValueError):
    """A training run that cannot start as asked (the message says why and what to do)."""


def wants_images(store_features: Mapping[str, Any], use_images: bool | str) -> bool:
    """`use_images: auto` means: images when the store records a camera."""
    return any(map(is_image_key, store_features)) if use_images == "auto" else bool(use_images)


def select_features(store_features: Mapping[str, Any], use_images: bool | str) -> dict:
    """The store features a policy trains on: observations (cameras only with images) and the action."""
    keep_images = wants_images(store_features, use_images)
    return {k: v for k, v in policy_features(store_features).items() if keep_images or not is_image_key(k)}


def optimizer_settings(optim: OptimConfig, policy_cfg: Mapping[str, Any]) -> OptimConfig:
    """train's `optim:` with its nulls filled from the policy config's `optim:` section."""
    policy_optim = policy_cfg.get("optim") or {}
    filled = {}
    for name in ("lr", "weight_decay", "ema_decay"):
        value = getattr(optim, name)
        if value is None:
            if policy_optim.get(name) is None:
                raise TrainError(f"optim.{name} is null and the policy config sets no optim.{name}: "
                                 f"pass optim.{name}=... or policy.optim.{name}=...")
            value = float(policy_optim[name])
        filled[name] = value
    return dataclasses.replace(optim, **filled)


def select_episodes(store: DemoStore, only_success: bool, max_episodes: int | None) -> list[int]:
    episodes = [e["index"] for e in store.episodes if e.get("success") or not only_success]
    if max_episodes:
        episodes = episodes[:max_episodes]
    if not episodes:
        raise TrainError(f"{store.path} has no {'successful ' if only_success else ''}episodes to train on.")
    return episodes


def make_optimizer(policy: torch.nn.Module, optim: OptimConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the policy's trainable weights and its warmup + cosine schedule (`optim` filled by
    `optimizer_settings`)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, steps)


class EMA:
    """Exponential moving average of the weights with the usual warmup (decay grows with the step count)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p, 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def _latest_state(ckpt_root: Path) -> Path | None:
    steps = sorted((p for p in ckpt_root.glob("step_*") if has_train_state(p)), key=lambda p: p.name)
    return steps[-1] if steps else None


class LossModule(torch.nn.Module):
    """`policy.loss` as a module's forward, which DistributedDataParallel wraps (it hooks forward, not `loss`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        return self.policy.loss(batch)


def batch_indices(cfg: TrainConfig, step: int, n_windows: int, weights: np.ndarray | None,
                  rank: int = 0, world: int = 1) -> np.ndarray:
    """The windows of `step` (from (seed, step) alone), rank `rank`'s contiguous shard of `world`."""
    rng = np.random.default_rng([cfg.seed, step])
    if weights is None:
        idx = rng.integers(0, n_windows, cfg.batch_size)
    else:
        idx = rng.choice(n_windows, cfg.batch_size, p=weights)
    return np.array_split(idx, world)[rank]


def noise_seed(cfg: TrainConfig, step: int, rank: int = 0, world: int = 1) -> int:
    """The torch seed of `step` on `rank` (a single process: rank 0 of 1)."""
    return (cfg.seed * 1_000_003 + step) * world + rank


def train(cfg: TrainConfig, policy_cfg: Mapping[str, Any], *, make_envs: Callable[[], object] | None = None,
          progress=None, log: Callable[[str], None] = print) -> dict:
    """Train the policy `policy_cfg` (configs/policy/<name>.yaml, validated by `make_policy`) as `cfg` says;
    `make_envs()` returns a vector env for evaluation (or None; with launcher=ddp it must be picklable)."""
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if ckpt_root.exists() and not cfg.resume:
        if not cfg.overwrite:
            raise TrainError(f"{out} already holds a training run: pass resume=true to continue it, "
                             "overwrite=true to start over, or another out=.")
        shutil.rmtree(out)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    if cfg.launcher == "ddp":
        return launch_ddp(cfg, policy_cfg, make_envs, log=log)
    return train_rank(cfg, policy_cfg, make_envs=make_envs, progress=progress, log=log)


def train_rank(cfg: TrainConfig, policy_cfg: Mapping[str, Any], *, make_envs: Callable[[], object] | None = None,
               progress=None, log: Callable[[str], None] = print, rank: int = 0, world: int = 1,
               resume: bool | None = None) -> dict | None:
    """The training loop of one process: rank `rank` of an initialized process group of `world` (or alone).
    Rank 0 checkpoints, evaluates, logs and returns the summary; the other ranks return None. `resume`: continue
    from out's last checkpoint (None: cfg.resume)."""
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    lead = rank == 0
    if cfg.batch_size % world:
        raise TrainError(f"batch_size={cfg.batch_size} does not split over nproc={world} ranks: pass a multiple.")
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)

    store = DemoStore.open(cfg.data)
    features = select_features(store.features, cfg.use_images)
    episodes = select_episodes(store, cfg.only_success, cfg.max_episodes)
    policy_cfg = dict(policy_cfg)
    optim = optimizer_settings(cfg.optim, policy_cfg)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    policy = make_policy(policy_cfg, features, store.stats)
    dataset = WindowDataset(store, policy.n_obs_steps, policy.horizon, keys=list(features), episodes=episodes,
                            tasks=policy.language)
    weights = None
    if cfg.quality_weighting:
        weights = np.asarray(dataset.sample_weights(), dtype=np.float64)
        weights = weights / weights.sum()

    steps = cfg.steps
    optimizer, scheduler = make_optimizer(policy, optim, steps)
    ema = EMA(policy, optim.ema_decay) if lead else None
    start_step = 0
    history: dict[str, list] = {"loss": [], "eval": []}
    if cfg.resume if resume is None else resume:
        state_dir = _latest_state(ckpt_root)
        if state_dir is not None:
            meta = load_train_state(state_dir, model=policy, optimizer=optimizer, scheduler=scheduler)
            if lead:
                ema.model.load_state_dict(_ema_weights(state_dir))
            start_step, history = meta["step"], meta["extra"]["history"]
            log(f"resumed from {state_dir} at step {start_step}")
    loss_fn: Callable = LossModule(policy)
    if world > 1:
        # every rank built the same initial weights from the seed; DDP also broadcasts rank 0's
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn)
    if cfg.compile:
        loss_fn = torch.compile(loss_fn)

    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    resolved = {"policy": policy_cfg, **to_dict(cfg)}  # the checkpoint's config.yaml: what `eval` and `deploy` read
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"training {policy_cfg['name']} ({n_params / 1e6:.2f}M parameters) on {len(episodes)} episodes, "
        f"{len(dataset)} windows, for {steps} steps" + (f" on {world} ranks" if world > 1 else ""))
    wants_eval = cfg.eval.episodes > 0 or cfg.eval.final_episodes > 0
    envs = make_envs() if (make_envs is not None and wants_eval and lead) else None
    started = time.perf_counter()
    train_seconds = 0.0
    policy.train()
    try:
        for step in range(start_step, steps):
            tick = time.perf_counter()
            idx = batch_indices(cfg, step, len(dataset), weights, rank, world)
            batch = {k: list(v) if v.dtype == object else torch.from_numpy(v)
                     for k, v in dataset.get_batch(idx).items()}
            torch.manual_seed(noise_seed(cfg, step, rank, world))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, metrics = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), optim.grad_clip)
            optimizer.step()
            scheduler.step()
            done = step + 1
            if world > 1 and (done % cfg.log_every == 0 or done == steps):  # the loss of the whole batch
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss /= world
            loss_value = loss.item()
            train_seconds += time.perf_counter() - tick
            if not lead:
                continue
            ema.update(policy, step)
            if done % cfg.log_every == 0 or done == steps:
                history["loss"].append([done, loss_value])
                writer.add_scalar("train/loss", loss_value, done)
                writer.add_scalar("train/grad_norm", float(grad_norm), done)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", float(v), done)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if (envs is not None and cfg.eval.episodes > 0 and cfg.eval.every
                    and done % cfg.eval.every == 0 and done < steps):
                result = evaluate(envs, ema.model, cfg.eval.episodes)
                history["eval"].append([done, result["success_rate"]])
                writer.add_scalar("eval/success_rate", result["success_rate"], done)
                log(f"step {done}: success {result['success_rate']:.2f} over {result['episodes']} episodes")
            if done % cfg.checkpoint_every == 0 or done == steps:
                _save(ckpt_root, done, ema.model, policy, optimizer, scheduler, resolved, history,
                      keep=cfg.keep_checkpoints)

        train_time = time.perf_counter() - started
        final = None
        if not lead:
            return None
        if envs is not None and cfg.eval.final_episodes > 0:
            final = evaluate(envs, ema.model, cfg.eval.final_episodes, video_dir=out / "videos",
                             n_videos=cfg.eval.videos)
            history["eval"].append([steps, final["success_rate"]])
            writer.add_scalar("eval/success_rate", final["success_rate"], steps)
    finally:
        if writer is not None:
            writer.close()
        if envs is not None:
            envs.close()
    plot_curves(history, out / "curves.png")
    summary = {
        "command": "train", "run": str(out), "checkpoint": str((ckpt_root / "last").resolve()),
        "policy": policy_cfg["name"], "parameters": n_params, "episodes": len(episodes), "steps": steps,
        "resumed_from_step": start_step, "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(train_time, 1), "final_loss": history["loss"][-1][1] if history["loss"] else None,
        "ranks": world,
        "samples_per_second": round((steps - start_step) * cfg.batch_size / max(train_seconds, 1e-9), 1),
        "eval": {k: v for k, v in (final or {}).items() if k != "per_episode"} or None,
        "curves": str(out / "curves.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(out / "summary.json")
    return summary


def launch_ddp(cfg: TrainConfig, policy_cfg: Mapping[str, Any], make_envs: Callable[[], object] | None, *,
               log: Callable[[str], None] = print) -> dict:
    """`cfg.nproc` ranks of `train_rank` in spawned processes, a gloo group on loopback; rank 0's summary.
    A rank that fails or dies ends the others (torch.multiprocessing) and the run, resumable from its last
    checkpoint. The ranks meet through a file (a TCP rendezvous store would listen on every interface) and gloo's
    own connections use the loopback interface."""
    import sys
    import tempfile

    import torch.multiprocessing as mp

    if cfg.nproc < 1:
        raise TrainError(f"nproc must be at least 1, got {cfg.nproc}.")
    if cfg.batch_size % cfg.nproc:
        raise TrainError(f"batch_size={cfg.batch_size} does not split over nproc={cfg.nproc} ranks: pass a multiple.")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    log(f"launching {cfg.nproc} ranks (DistributedDataParallel, gloo on loopback)")
    with tempfile.TemporaryDirectory(prefix="robopolicy_ddp_") as rendezvous:
        try:
            mp.spawn(_ddp_rank, args=(cfg.nproc, str(Path(rendezvous) / "store"), to_dict(cfg), dict(policy_cfg),
                                      make_envs), nprocs=cfg.nproc, join=True)
        except mp.ProcessExitedException as e:
            raise TrainError(f"rank {e.error_index} of {cfg.nproc} died (exit code {e.exit_code}); {cfg.out} keeps "
                             "its last checkpoint: rerun with resume=true to continue.") from None
        except mp.ProcessRaisedException as e:
            last = str(e).strip().splitlines()[-1]
            raise TrainError(f"a rank of the ddp run failed: {last}") from None
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    summary["summary"] = str(Path(cfg.out) / "summary.json")
    return summary


def _ddp_rank(rank: int, world: int, store_file: str, cfg: dict, policy_cfg: dict, make_envs) -> None:
    import sys

    import torch.distributed as dist

    from robopolicy.config import from_mapping

    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    try:
        progress = None
        if rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=cfg["steps"], desc=f"train {policy_cfg.get('name')} ({world} ranks)",
                            file=sys.stderr, dynamic_ncols=True, disable=None)
        # the launcher prepared out (refused, replaced or kept it): every rank continues whatever it holds
        train_rank(from_mapping(TrainConfig, cfg), policy_cfg, make_envs=make_envs, resume=True,
                   progress=progress, log=(lambda m: print(m, file=sys.stderr)) if rank == 0 else (lambda m: None),
                   rank=rank, world=world)
        if progress is not None:
            progress.close()
        # finished ranks meet before tearing gloo down (one that destroyed its group while the other still used
        # their pair could make the other abort); not on an error: a barrier would wait for a dead rank
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ema_weights(state_dir: Path) -> dict:
    """The EMA weights of a step checkpoint (its model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(state_dir / "model.safetensors"))


def _save(ckpt_root: Path, step: int, ema_model, policy, optimizer, scheduler, config: dict,
          history: dict, keep: int | None = 2) -> None:
    target = ckpt_root / f"step_{step:07d}"
    if target.exists():
        shutil.rmtree(target)
    save_checkpoint(target, ema_model, config=config, extra_json={"step": step})
    save_train_state(target, step=step, model=policy, optimizer=optimizer, scheduler=scheduler,
                     extra={"history": history})
    point_last(target)
    if keep is not None:  # the newest `keep` step checkpoints (null: all)
        for old in sorted(ckpt_root.glob("step_*"))[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.5))
    if history["loss"]:
        steps, losses = zip(*history["loss"])
        ax_loss.plot(steps, losses)
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    if history["eval"]:
        steps, rates = zip(*history["eval"])
        ax_eval.plot(steps, rates, marker="o")
    ax_eval.set(xlabel="step", ylabel="success rate", ylim=(-0.02, 1.02), title="evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
