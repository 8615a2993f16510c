"""PPO through the sampling chain (reinflow on a flow base, dppo on a diffusion base): the log-probability PPO
recomputes for a stored chain is the one recorded while sampling, zero advantages leave the sampled chunks as
they were, and a short `finetune` run saves a plain checkpoint that loads and evaluates with its base deleted."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from einops import rearrange
from test_policies import make_stats, small_config
from test_rl_core import TASK, base_ckpt, finetune_cfg, make_envs  # noqa: F401  (base_ckpt is a fixture)

import sim
from robopolicy.checkpoint import base_reference, read_checkpoint_info, save_checkpoint
from robopolicy.config import config_class, from_mapping
from robopolicy.evaluate import evaluate
from robopolicy.features import features_from_env
from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.policies import make_policy
from robopolicy.policies.base import PolicyConfigError
from robopolicy.rl import METHODS
from robopolicy.rl.ppo import PPO

SMALL = {"hidden": [32, 32], "noise_hidden": [32], "ppo_rollout": 8, "ppo_minibatch": 4, "ppo_epochs": 2}


@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory):
    env = sim.make_env(TASK)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    torch.manual_seed(0)
    cfg = small_config("diffusion", num_inference_steps=4)
    policy = make_policy(cfg, features, make_stats(features, -1.0, 1.0)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("dppo") / "base", policy, config={"policy": cfg, "task": TASK})


def chain_method(name: str, ckpt, **settings):
    module = METHODS[name]
    cfg = from_mapping(config_class("algo", name), {"name": name, **settings})
    method, _ = module.make_method(load_policy(ckpt), base_reference(ckpt), cfg, None, seed=0)
    return method


def observation(policy, batch: int = 6) -> dict[str, torch.Tensor]:
    shape = policy.features["observation.state"]["shape"]
    return {"observation.state": torch.randn(batch, policy.n_obs_steps, *shape)}


def randomize(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Weights far from their initial values, so the chain's stds and means depend on state and step."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(params=[("reinflow", True), ("reinflow", False), ("dppo", True), ("dppo", False),
                        ("dppo-ddpm", True), ("dppo-ddpm", False)],
                ids=lambda p: f"{p[0]}-{'average' if p[1] else 'sum'}")
def method(request, base_ckpt, diffusion_ckpt):  # noqa: F811
    """The method on a small base; log_prob_average: PPO's ratio on the per-element average or the exact sum;
    dppo-ddpm: dppo's DDPM chain (posterior means and stds)."""
    name, average = request.param
    ckpt = base_ckpt if name == "reinflow" else diffusion_ckpt
    torch.manual_seed(1)
    settings = {k: v for k, v in SMALL.items() if k != "noise_hidden" or name == "reinflow"}
    if name == "dppo-ddpm":
        name, settings = "dppo", {**settings, "chain": "ddpm"}
    m = chain_method(name, ckpt, log_prob_average=average, **settings)
    if name == "reinflow":
        randomize(m.policy.noise_net)
    return m


def test_recomputed_chain_log_prob_equals_the_recorded_one(method):
    obs = observation(method.policy, 16)
    inputs = method.observe(obs)
    with torch.no_grad():
        _, actions, extras = method.act(obs, inputs, list(range(16)), explore=True)
    assert actions.shape == (16, method.policy.n_exec, method.policy.action_dim)
    idx = torch.randperm(16)[:5]  # as a PPO minibatch recomputes it: another batch, another order
    with torch.no_grad():
        recomputed, entropy = method.log_prob(inputs[idx], extras["u"][idx])
    assert recomputed.shape == extras["log_prob"][idx].shape and torch.isfinite(entropy).all()
    # the default (the chunk's per-element average, what PPO's ratio uses) within 1e-5; the exact sum over the chunk's
    # H x A elements is ~30 here, where float32 rounds at ~4e-6 and another batch's matmul kernels differ by a few
    # ulps (measured 1.1e-5 on one machine's BLAS), so the sum is held to 1e-5 relative
    tolerance = 1e-5 * (1.0 if method.log_prob_scale < 1.0 else max(1.0, extras["log_prob"][idx].abs().max().item()))
    assert (recomputed - extras["log_prob"][idx]).abs().max() <= tolerance
    # the score is a real density: another chain from the same state scores differently
    other = extras["u"][idx].roll(1, dims=0)
    with torch.no_grad():
        assert (method.log_prob(inputs[idx], other)[0] - recomputed).abs().max() > 1e-3


@pytest.mark.parametrize("executed", [True, False], ids=["executed", "whole-chunk"])
@pytest.mark.parametrize("name", ["reinflow", "dppo"])
def test_score_executed_scores_only_the_executed_chunk_steps(base_ckpt, diffusion_ckpt, name, executed):  # noqa: F811
    """score_executed (default): moving a final-step element outside the executed slice leaves the score unchanged,
    moving an executed one does not; scoring the whole chunk, both move it. Recomputed = recorded either way."""
    torch.manual_seed(1)
    settings = {k: v for k, v in SMALL.items() if k != "noise_hidden" or name == "reinflow"}
    method = chain_method(name, base_ckpt if name == "reinflow" else diffusion_ckpt, score_executed=executed,
                          **settings)
    policy = method.policy
    scored_steps = policy.n_exec if executed else policy.horizon
    assert policy.n_exec < policy.horizon and method.log_prob_scale == 1.0 / (scored_steps * policy.action_dim)
    obs = observation(policy, 8)
    inputs = method.observe(obs)
    with torch.no_grad():
        _, _, extras = method.act(obs, inputs, list(range(8)), explore=True)
        recomputed, _ = method.log_prob(inputs, extras["u"])
        assert (recomputed - extras["log_prob"]).abs().max() <= 1e-5
        chain = rearrange(extras["u"], "b (k h a) -> b k h a", h=policy.horizon, a=policy.action_dim)
        unexecuted = [h for h in range(policy.horizon) if h not in range(policy.horizon)[policy.exec_slice]]
        for steps, moves in ((unexecuted, not executed), (policy.exec_slice, True)):
            moved = chain.clone()
            moved[:, -1, steps] += 0.5
            changed = method.log_prob(inputs, moved.flatten(1))[0] - recomputed  # dppo [B, K]: its last step moved
            changed = changed.reshape(8, -1)[:, -1].abs()
            assert changed.min() > 1e-3 if moves else changed.max() < 1e-6


def rollout_batch(method, n: int = 16, adv: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    obs = observation(method.policy, n)
    inputs = method.observe(obs)
    with torch.no_grad():
        _, _, extras = method.act(obs, inputs, list(range(n)), explore=True)
    return {"obs": inputs, "value_in": inputs, "u": extras["u"], "log_prob": extras["log_prob"], "mask": torch.ones(n),
            "adv": torch.zeros(n) if adv is None else adv, "ret": torch.randn(n)}


def test_ppo_step_with_zero_advantages_leaves_sampled_chunks_unchanged(method):
    policy = method.policy
    obs, noise = observation(policy, 8), torch.randn(8, *policy.noise_shape)

    def sampled() -> torch.Tensor:
        torch.manual_seed(5)  # the same draws for a stochastic sampler (dppo's ddpm chain) too
        return policy.sample_chunk(obs, noise)

    before = sampled()
    metrics = method.ppo.optimize(rollout_batch(method))
    assert all(math.isfinite(v) for v in metrics.values())
    assert torch.allclose(sampled(), before, atol=1e-6)
    # the same step with advantages does move them (the check above can fail)
    method.ppo.optimize(rollout_batch(method, adv=torch.randn(16)))
    assert not torch.allclose(sampled(), before, atol=1e-6)


def test_value_warmup_trains_only_the_value_network(base_ckpt):  # noqa: F811
    method = chain_method("reinflow", base_ckpt, value_warmup=1, **SMALL)
    policy, ppo = method.policy, method.ppo
    obs, noise = observation(policy, 8), torch.randn(8, *policy.noise_shape)
    before, value = policy.sample_chunk(obs, noise), [p.clone() for p in ppo.value.parameters()]
    batch = rollout_batch(method, adv=torch.randn(16))
    keys = {"obs": "obs", "next_obs": "obs", "u": "u", "log_prob": "log_prob", "policy_mask": "mask"}
    episode = {k: batch[v].numpy() for k, v in keys.items()}
    n = len(batch["adv"])
    episode |= {"reward": torch.randn(n).numpy(), "steps": torch.full((n,), 4.0).numpy(),
                "done": torch.zeros(n).numpy()}
    ppo.rollouts.add(episode)
    ppo.update()  # the warm-up update: the value moves, the fine-tuned chain does not
    assert torch.equal(policy.sample_chunk(obs, noise), before)
    assert any(not torch.equal(a, b) for a, b in zip(value, ppo.value.parameters(), strict=True))
    ppo.rollouts.add(episode)
    ppo.update()  # after it, the actor learns too (the check above can fail)
    assert not torch.allclose(policy.sample_chunk(obs, noise), before, atol=1e-6)


def test_normalized_returns_scale_the_value_targets(base_ckpt):  # noqa: F811
    """normalize_returns: V(s) = scale x value(s) with scale the returns' std, so large returns fit quickly."""
    method = chain_method("reinflow", base_ckpt, normalize_returns=True, value_warmup=100, lr=1e-2, **SMALL)
    ppo, batch = method.ppo, rollout_batch(method)
    n = len(batch["adv"])
    episode = {"obs": batch["obs"].numpy(), "next_obs": batch["obs"].numpy(), "u": batch["u"].numpy(),
               "log_prob": batch["log_prob"].numpy(), "policy_mask": batch["mask"].numpy(),
               "reward": (100.0 * torch.randn(n)).numpy(), "steps": torch.full((n,), 4.0).numpy(),
               "done": torch.ones(n).numpy()}  # one-decision episodes: the return is the reward
    for _ in range(30):
        ppo.rollouts.add(episode)
        ppo.update()
    assert 50.0 < ppo.return_scale < 200.0
    with torch.no_grad():
        fitted = ppo.value(batch["obs"]).squeeze(-1) * ppo.return_scale
    ret = torch.from_numpy(episode["reward"])
    assert (fitted - ret).pow(2).mean() < 0.5 * ret.var()  # V(s) tracks returns of std ~100


@pytest.mark.parametrize("name", ["reinflow", "dppo"])
def test_value_on_noise_takes_the_spread_x0_causes_out_of_the_advantages(name, base_ckpt, diffusion_ckpt):  # noqa: F811
    """From one state, returns that depend only on the chain's first element x_0: V(s, x_0) learns them and the
    advantages shrink to their residual noise; V(s) cannot, and the advantages keep the returns' spread."""

    def advantage_spread(on_noise: bool) -> float:
        torch.manual_seed(5)
        settings = {k: v for k, v in SMALL.items() if k != "noise_hidden" or name == "reinflow"}
        settings |= {"ppo_minibatch": 64, "ppo_epochs": 4}
        method = chain_method(name, base_ckpt if name == "reinflow" else diffusion_ckpt, value_on_noise=on_noise,
                              value_warmup=1000, lr=3e-3, **settings)
        n = 64
        obs = {k: v[:1].expand(n, *v.shape[1:]) for k, v in observation(method.policy, 1).items()}
        inputs = method.observe(obs)
        with torch.no_grad():
            _, _, extras = method.act(obs, inputs, list(range(n)), explore=True)
        x0 = extras["u"][:, :method.chunk_size]
        reward = 10.0 * torch.sign(x0[:, 0]) + 0.1 * torch.randn(n)
        episode = {"obs": inputs.numpy(), "next_obs": inputs.numpy(), "u": extras["u"].numpy(),
                   "log_prob": extras["log_prob"].numpy(), "policy_mask": torch.ones(n).numpy(),
                   "reward": reward.numpy(), "steps": torch.full((n,), 4.0).numpy(),
                   "done": torch.ones(n).numpy()}  # one-decision episodes: the return is the reward
        for _ in range(15):  # value-only updates (value_warmup)
            method.ppo.rollouts.add(episode)
            method.ppo.update()
        method.ppo.rollouts.add(episode)
        return method.ppo.advantages()["adv"].std().item()

    with_noise, without = advantage_spread(True), advantage_spread(False)
    assert without > 8.0  # V(s) is one number here: the advantages are the returns' spread (std ~10)
    assert with_noise < 0.3 * without


def test_separate_grad_clip_keeps_the_value_loss_from_shrinking_the_actor_step(base_ckpt):  # noqa: F811
    """Value targets of ~1e5 (unnormalized returns) leave the fine-tuned chain's step as it is with small ones when
    the actor's gradient is clipped on its own; with the joint norm clipped, the value loss's scale changes the
    actor's step (Adam undoes a constant scale, not one that varies from minibatch to minibatch)."""

    def actor_step(separate: bool, ret_scale: float) -> torch.Tensor:
        torch.manual_seed(3)
        method = chain_method("reinflow", base_ckpt, separate_grad_clip=separate, **SMALL)
        torch.manual_seed(4)
        batch = rollout_batch(method, adv=torch.randn(16))
        batch["ret"] = batch["ret"] * ret_scale
        before = [p.detach().clone() for p in method.ppo.actor_params]
        metrics = method.ppo.optimize(batch)
        assert {"approx_kl", "actor_grad_norm", "value_grad_norm"} <= set(metrics)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(method.ppo.actor_params, before, strict=True)])

    small, large = actor_step(True, 1.0), actor_step(True, 1e5)
    assert small.norm() > 0 and torch.allclose(small, large, atol=1e-7)
    joint_small, joint_large = actor_step(False, 1.0), actor_step(False, 1e5)
    assert (joint_large - joint_small).norm() > 0.1 * joint_small.norm()


@pytest.mark.parametrize("name", ["reinflow", "dppo"])
def test_finetune_saves_a_plain_checkpoint_that_runs_without_its_base(tmp_path, base_ckpt, diffusion_ckpt,  # noqa: F811
                                                                      name):
    base_src = base_ckpt if name == "reinflow" else diffusion_ckpt
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    extra = {"noise_hidden": [32]} if name == "reinflow" else {}
    cfg = finetune_cfg({"name": name, **{k: v for k, v in SMALL.items() if k != "noise_hidden"}, **extra,
                        "value_warmup": 0},  # the actor learns from the first update
                       base, tmp_path / "run")
    summary = finetune(cfg, make_envs, log=lambda m: None)
    assert summary["env_steps"] == 64 and summary["updates"] > 0
    assert {"policy_loss", "value_loss", "clip_frac"} <= set(summary["last_metrics"])
    assert all(math.isfinite(v) for v in summary["last_metrics"].values())
    info = read_checkpoint_info(tmp_path / "run" / "checkpoints" / "last")
    kind = "flow" if name == "reinflow" else "diffusion"
    assert info["policy"] == kind and "base" not in info["config"]["policy"]
    assert info["extra"]["refined_from"]["path"] == str(base.resolve())
    tuned = load_policy(tmp_path / "run" / "checkpoints" / "last")
    before = {k: v.clone() for k, v in load_policy(base).state_dict().items()}
    shutil.rmtree(base)  # the fine-tuned weights stand alone
    policy = load_policy(tmp_path / "run" / "checkpoints" / "last")
    assert type(policy).__name__ == type(tuned).__name__
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())  # the weights moved
    envs = make_envs(1)
    try:
        result = evaluate(envs, policy, 2, seed=0)
    finally:
        envs.close()
    assert result["episodes"] == 2


@pytest.mark.parametrize("name", ["reinflow", "dppo"])
def test_chain_mean_is_the_plain_sampler(base_ckpt, diffusion_ckpt, name):  # noqa: F811
    """With (almost) no injected noise the chain ends where the saved checkpoint's deterministic sampler does."""
    tiny = {"min_std": 1e-7, "max_std": 1e-7} if name == "reinflow" else {"chain": "ddim", "min_sampling_std": 1e-7}
    method = chain_method(name, base_ckpt if name == "reinflow" else diffusion_ckpt, **tiny)
    randomize(method.policy.model.denoiser, 0.05)
    policy = method.policy
    obs = observation(policy, 5)
    with torch.no_grad():
        chain, _ = policy.sample_chain(policy.encode(obs), torch.Generator().manual_seed(7))
        noise = torch.randn(5, *policy.noise_shape, generator=torch.Generator().manual_seed(7))
        plain = policy.normalize_actions(policy.standalone().sample_chunk(obs, noise))
    assert torch.allclose(policy.final_chunk(chain), plain, atol=1e-4)


def test_reinflow_refuses_a_diffusion_base(diffusion_ckpt):
    with pytest.raises(PolicyConfigError, match="reinflow fine-tunes a 'flow' base"):
        chain_method("reinflow", diffusion_ckpt)


def test_reinflow_noise_stays_within_its_bounds(base_ckpt):  # noqa: F811
    method = chain_method("reinflow", base_ckpt, min_std=0.02, max_std=0.3, noise_hidden=[16])
    randomize(method.policy.noise_net, 10.0)  # saturating outputs
    policy = method.policy
    cond = torch.randn(64, policy.feature_dim) * 10
    std = policy.step_std(cond, torch.randn(64, *policy.noise_shape) * 10, 0.5)
    assert std.min() >= 0.02 - 1e-7 and std.max() <= 0.3 + 1e-7 and std.max() - std.min() > 0.2


def test_refine_benchmark_runs_chain_methods_on_their_own_bases(tmp_path, monkeypatch, base_ckpt,  # noqa: F811
                                                                diffusion_ckpt):
    """reinflow on --base (flow), dppo on its --base-for (diffusion), steer_bottleneck skipped on a plain base."""
    import json
    import sys

    from conftest import load_benchmark

    bench = load_benchmark("refine_sample_efficiency")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    small = [f"--set={name}.{k}={json.dumps(v)}" for name in ("reinflow", "dppo")
             for k, v in {"hidden": [16], "ppo_rollout": 4, "ppo_minibatch": 4, "ppo_epochs": 1}.items()]
    monkeypatch.setattr(sys, "argv", [
        "refine_sample_efficiency.py", "--base", str(base_ckpt), "--task", TASK, "--algos",
        "reinflow,dppo,steer_bottleneck", "--base-for", f"dppo={diffusion_ckpt}", "--env-steps", "40",
        "--eval-every", "0", "--eval-episodes", "0", "--final-episodes", "2", "--base-episodes", "2",
        "--num-envs", "1", "--out", str(tmp_path / "runs"), *small])
    bench.main()
    report = json.loads((tmp_path / "refine_sample_efficiency.json").read_text())
    results = report["results"]
    assert results["reinflow"]["env_steps"] >= 40 and results["dppo"]["base"] == str(diffusion_ckpt.resolve())
    assert "bottleneck=vib" in results["steer_bottleneck"]["skipped"]
    assert set(report["base_evals"]) == {str(base_ckpt.resolve()), str(diffusion_ckpt.resolve())}


def test_dppo_runs_a_ddpm_base_as_its_ddim_chain(tmp_path):
    """The weights do not depend on the sampler: with chain=ddim, a base sampled with ancestral DDPM is fine-tuned
    (and saved) with the DDIM chain whose steps are the fine-tuned Gaussian steps' means."""
    env = sim.make_env(TASK)
    features = features_from_env(env.observation_space, env.action_space)
    env.close()
    cfg = small_config("diffusion", num_inference_steps=4, sampler="ddpm")
    policy = make_policy(cfg, features, make_stats(features, -1.0, 1.0)).eval()
    ckpt = save_checkpoint(tmp_path / "ddpm", policy, config={"policy": cfg, "task": TASK})
    method = chain_method("dppo", ckpt, chain="ddim", min_sampling_std=1e-7)
    tuned = method.policy.standalone()
    assert tuned.sampler == "ddim" and tuned.config["sampler"] == "ddim" and load_policy(ckpt).sampler == "ddpm"
    obs = observation(method.policy, 3)
    with torch.no_grad():
        chain, _ = method.policy.sample_chain(method.policy.encode(obs), torch.Generator().manual_seed(2))
        noise = torch.randn(3, *method.policy.noise_shape, generator=torch.Generator().manual_seed(2))
        plain = method.policy.normalize_actions(tuned.sample_chunk(obs, noise))
    assert torch.allclose(method.policy.final_chunk(chain), plain, atol=1e-4)


def test_dppo_ddpm_chain_is_the_ddpm_samplers_own(diffusion_ckpt):
    """chain=ddpm: each fine-tuned step's mean and std are the DDPM posterior's that diffusers' DDPMScheduler.step
    samples from (its std raised to min_sampling_std where smaller), so the refined checkpoint, saved with the DDPM
    sampler, runs the chain without the exploration floor."""
    method = chain_method("dppo", diffusion_ckpt, chain="ddpm", min_sampling_std=1e-9, min_logprob_std=1e-9,
                          ft_denoising_steps=3)
    policy = method.policy
    scheduler = policy.model.sample_scheduler
    assert policy.standalone().sampler == "ddpm" and policy.standalone().config["sampler"] == "ddpm"
    assert load_policy(diffusion_ckpt).sampler == "ddim"
    obs = observation(policy, 4)
    cond = policy.encode(obs)
    stds = []
    for k, t in enumerate(policy.timesteps[-policy.ft_steps:]):
        x = torch.randn(4, *policy.noise_shape)
        with torch.no_grad():
            sampled = scheduler.step(policy.model.denoiser(x, t.expand(4), cond), t, x,
                                     generator=torch.Generator().manual_seed(k)).prev_sample
            mean = policy.step_mean(cond, x, t, k)
        noise = torch.randn(sampled.shape, generator=torch.Generator().manual_seed(k))
        std = policy.stds[k] if t > 0 else 0.0  # the final step adds no noise in diffusers
        assert torch.allclose(mean + std * noise, sampled, atol=1e-5)
        stds.append(float(policy.stds[k]))
    assert stds[0] > stds[1] > 0.01  # the posterior's std shrinks toward the clean chunk
    floored = chain_method("dppo", diffusion_ckpt, chain="ddpm", min_sampling_std=0.3, ft_denoising_steps=3).policy
    assert floored.stds.min().item() == pytest.approx(0.3) and floored.stds.max().item() >= stds[0] - 1e-6


def test_a_ddpm_checkpoint_evaluates_the_same_twice_and_leaves_the_callers_stream(diffusion_ckpt, tmp_path):
    """dppo's ddpm chain saves a checkpoint whose sampler draws inside its steps (from torch's global generator):
    evaluate seeds those draws with its seed (the same per-episode returns twice, whatever came before) and hands the
    caller's stream back as it was."""
    policy = chain_method("dppo", diffusion_ckpt, chain="ddpm").policy.standalone()
    randomize(policy.denoiser, 0.05)
    envs = make_envs(2)
    try:
        runs = []
        for before in (1, 2):
            torch.manual_seed(before)
            expected_next = torch.rand(3)
            torch.manual_seed(before)
            runs.append([e["return"] for e in evaluate(envs, policy, 4, seed=3)["per_episode"]])
            assert torch.equal(torch.rand(3), expected_next)
        other = [e["return"] for e in evaluate(envs, policy, 4, seed=4)["per_episode"]]
    finally:
        envs.close()
    assert runs[0] == runs[1] and other != runs[0]


def test_dppo_clip_schedule_holds_the_early_denoising_steps_tighter(diffusion_ckpt):
    """first_step_clip (DPPO's clip_ploss_coef_base): the first fine-tuned step's ratio bound is that fraction of
    ppo_clip, growing to ppo_clip at the final step; a ratio the final step's bound admits is clipped at the first
    step, so PPO's update moves the final step's parameters and not the first's."""
    small = {k: v for k, v in SMALL.items() if k != "noise_hidden"}
    default = chain_method("dppo", diffusion_ckpt, ppo_clip=0.03, **small)
    assert default.ppo.step_clip.tolist() == pytest.approx([0.03] * default.policy.ft_steps)
    scheduled = chain_method("dppo", diffusion_ckpt, ppo_clip=0.03, first_step_clip=0.1, **small)
    clip = scheduled.ppo.step_clip
    assert clip[0].item() == pytest.approx(0.003) and clip[-1].item() == pytest.approx(0.03)
    assert (clip.diff() > 0).all()
    for bad in ({"first_step_clip": 0.0}, {"first_step_clip": 1.5}, {"clip_rate": 0.0}):
        with pytest.raises(ValueError, match="first_step_clip"):
            from_mapping(config_class("algo", "dppo"), {"name": "dppo", **bad})

    def moved_steps(step_clip: torch.Tensor) -> torch.Tensor:
        """One PPO pass of a two-step 'chain' whose log-probabilities are theta_k * u_k (stored ones 0: ratio
        exp(u_k)); u = +-log 1.02 with advantages of the same sign, so each ratio leaves a bound of 0.01."""
        theta = torch.nn.Parameter(torch.ones(2))
        actor = torch.nn.Module()
        actor.theta = theta
        cfg = from_mapping(config_class("algo", "dppo"), {"name": "dppo", "ppo_epochs": 1, "ppo_minibatch": 2,
                                                          "hidden": [4]})
        ppo = PPO(3, 0, cfg, actor=actor, log_prob=lambda obs, u: (theta * u, torch.zeros(len(u))),
                  step_weights=torch.ones(2), step_clip=step_clip, actor_lr=1e-2)
        u = torch.tensor([[math.log(1.02)] * 2, [math.log(0.98)] * 2])
        ppo.optimize({"obs": torch.zeros(2, 3), "value_in": torch.zeros(2, 3), "u": u, "log_prob": torch.zeros(2, 2),
                      "mask": torch.ones(2), "adv": torch.tensor([1.0, -1.0]), "ret": torch.zeros(2)})
        return (theta.detach() - 1.0).abs() > 1e-6

    assert moved_steps(torch.tensor([0.01, 0.03])).tolist() == [False, True]
    assert moved_steps(torch.tensor([0.03, 0.03])).tolist() == [True, True]
