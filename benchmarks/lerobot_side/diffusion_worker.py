"""Run with LeRobot's interpreter: host one LeRobot `DiffusionPolicy` and answer commands over a pipe.

    /work/main/.venv-lerobot/bin/python diffusion_worker.py      (driven by benchmarks/train_vs_lerobot.py)

Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout (everything LeRobot
prints goes to stderr). Arrays travel as {"__array__": base64 of the raw bytes, "dtype", "shape"}; never pickle.
Commands:
    setup     dataset (a LeRobotDataset v3.0 root), images, threads, batch_size, seed, config (DiffusionConfig
              overrides), match_params (choose down_dims (c, 2c, 4c) whose parameter count is closest),
              scheduler_steps -> parameters, down_dims, config summary
    train     steps, max_seconds, warmup -> per-step seconds (data loading, compute), losses
    latency   calls, warmup -> seconds per action chunk at batch size 1 (preprocess, chunk, postprocess)
    reset     policy.reset() before a batch of lock-step rollouts
    act       obs ({key: [N, ...]} as our envs give them) -> action [N, A] through select_action
    quit
LeRobot's DiffusionPolicy needs an image or `observation.environment_state` beside the state, so a state-only
dataset feeds its state in both slots (the conditioning doubles in width; nothing else changes).
"""

import base64
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lerobot  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata  # noqa: E402
from lerobot.datasets.utils import dataset_to_policy_features  # noqa: E402
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig  # noqa: E402
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402
from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors  # noqa: E402

STATE, ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"


def encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"__array__": base64.b64encode(array.tobytes()).decode(), "dtype": str(array.dtype),
            "shape": list(array.shape)}


def decode(obj: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["__array__"]), dtype=obj["dtype"]).reshape(obj["shape"])


class Worker:
    def __init__(self):
        self.policy = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, dataset: str, images: bool, threads: int | None, batch_size: int = 8, seed: int = 0,
              config: dict | None = None, match_params: int | None = None, scheduler_steps: int = 100_000) -> dict:
        if threads:  # None: torch's default (all cores), as a plain LeRobot run has it
            torch.set_num_threads(int(threads))
        torch.manual_seed(seed)
        self.root, self.images, self.batch_size, self.seed = dataset, images, batch_size, seed
        self.meta = LeRobotDatasetMetadata("robopolicy/bench", root=dataset)
        features = dataset_to_policy_features(self.meta.features)
        inputs = {STATE: features[STATE]}
        self.camera_keys = [k for k in features if k.startswith("observation.images.")][:1] if images else []
        inputs.update({k: features[k] for k in self.camera_keys})
        if not self.camera_keys:
            inputs[ENV_STATE] = PolicyFeature(type=FeatureType.ENV, shape=features[STATE].shape)
        overrides = dict(config or {})
        if match_params:
            overrides["down_dims"] = self._match(inputs, features, overrides, int(match_params))
        if "down_dims" in overrides:
            overrides["down_dims"] = tuple(overrides["down_dims"])
        self.config = DiffusionConfig(input_features=inputs, output_features={ACTION: features[ACTION]},
                                      device="cpu", **overrides)
        self.policy = DiffusionPolicy(self.config)
        stats = {k: dict(v) for k, v in self.meta.stats.items()}
        stats[ENV_STATE] = stats[STATE]
        self.preprocess, self.postprocess = make_diffusion_pre_post_processors(self.config, dataset_stats=stats)
        self.optimizer = self.config.get_optimizer_preset().build(self.policy.get_optim_params())
        self.scheduler = self.config.get_scheduler_preset().build(self.optimizer, scheduler_steps)
        self.grad_clip = self.config.get_optimizer_preset().grad_clip_norm
        self.batches = None
        return {"parameters": n_params(self.policy), "down_dims": list(self.config.down_dims),
                "num_inference_steps": self.config.num_inference_steps or self.config.num_train_timesteps,
                "noise_scheduler": self.config.noise_scheduler_type, "vision_backbone":
                self.config.vision_backbone if self.camera_keys else None, "inputs": sorted(inputs),
                "batch_size": batch_size, "lr": self.config.optimizer_lr, "grad_clip_norm": self.grad_clip,
                "threads": torch.get_num_threads(), "lerobot": lerobot.__version__, "torch": torch.__version__}

    def _match(self, inputs: dict, features: dict, overrides: dict, target: int) -> list[int]:
        """down_dims (c, 2c, 4c) with the parameter count closest to `target` (the count grows with c)."""
        def count(c: int) -> int:
            cfg = DiffusionConfig(input_features=inputs, output_features={ACTION: features[ACTION]}, device="cpu",
                                  **{**overrides, "down_dims": (c, 2 * c, 4 * c)})
            return n_params(DiffusionPolicy(cfg))

        lo, hi = 8, 512
        while hi - lo > 8:  # bisect on multiples of 8 (GroupNorm needs c divisible by n_groups)
            mid = (lo + hi) // 16 * 8
            lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
        best = min((lo, hi), key=lambda c: abs(count(c) - target))
        return [best, 2 * best, 4 * best]

    # --------------------------------------------------------------------------------------------- training
    def _next_batch(self) -> dict:
        if self.batches is None:
            fps = self.meta.fps
            obs_times = [i / fps for i in self.config.observation_delta_indices]
            delta = {STATE: obs_times, ACTION: [i / fps for i in self.config.action_delta_indices]}
            delta.update({k: obs_times for k in self.camera_keys})
            dataset = LeRobotDataset("robopolicy/bench", root=self.root, delta_timestamps=delta)
            generator = torch.Generator().manual_seed(self.seed)
            # num_workers=0: both projects load batches in the training process, on the same 2 cores
            self.loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=True,
                                                      drop_last=True, num_workers=0, generator=generator)
            self.batches = iter(self.loader)
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        if not self.camera_keys:
            batch[ENV_STATE] = batch[STATE]
        return batch

    def train(self, steps: int, max_seconds: float | None = None, warmup: int = 0) -> dict:
        """lerobot_train's update step: preprocess, forward, backward, clip, optimizer and scheduler step."""
        self.policy.train()
        for _ in range(warmup):
            self._step()
        data_s, compute_s, losses = [], [], []
        started = time.perf_counter()
        while len(losses) < steps and (max_seconds is None or time.perf_counter() - started < max_seconds):
            tick = time.perf_counter()
            batch = self._next_batch()
            tock = time.perf_counter()
            losses.append(self._update(batch))
            compute_s.append(time.perf_counter() - tock)
            data_s.append(tock - tick)
        return {"steps": len(losses), "data_s": data_s, "compute_s": compute_s, "losses": losses}

    def _step(self) -> float:
        return self._update(self._next_batch())

    def _update(self, batch: dict) -> float:
        batch = self.preprocess(batch)
        loss, _ = self.policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        return float(loss.item())

    # ------------------------------------------------------------------------------------------- inference
    def _observation(self, obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Our env's observations [N, ...] -> LeRobot's (float images [N, 3, H, W] in [0, 1])."""
        out = {STATE: torch.from_numpy(np.asarray(obs[STATE], dtype=np.float32))}
        for key in self.camera_keys:
            out[key] = torch.from_numpy(np.asarray(obs[key])).permute(0, 3, 1, 2).float() / 255.0
        if not self.camera_keys:
            out[ENV_STATE] = out[STATE]
        return out

    @torch.no_grad()
    def _select(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.postprocess(self.policy.select_action(self.preprocess(obs)))

    def latency(self, calls: int, warmup: int = 1) -> dict:
        """One chunk per call: reset empties the action queue, so select_action generates a new chunk."""
        self.policy.eval()
        rng = np.random.default_rng(0)
        obs = {STATE: rng.normal(size=(1, *self.config.input_features[STATE].shape)).astype(np.float32)}
        for key in self.camera_keys:
            c, h, w = self.config.input_features[key].shape
            obs[key] = rng.integers(0, 256, (1, h, w, c), dtype=np.uint8)
        seconds = []
        for i in range(warmup + calls):
            self.policy.reset()
            tick = time.perf_counter()
            self._select(self._observation(obs))
            if i >= warmup:
                seconds.append(time.perf_counter() - tick)
        return {"seconds": seconds}

    def reset(self) -> dict:
        self.policy.eval()
        self.policy.reset()
        return {}

    def act(self, obs: dict) -> dict:
        action = self._select(self._observation({k: decode(v) for k, v in obs.items()}))
        return {"action": encode(action.numpy().astype(np.float32))}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    reply_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything LeRobot (or C code) prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("cmd")
        if command == "quit":
            break
        try:
            reply = {"ok": True, **getattr(worker, command)(**request)}
        except Exception as error:  # report, keep serving: the caller decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()


if __name__ == "__main__":
    main()
