"""Online refinement of a frozen base policy in simulation: latent-noise steering (`steer`, `steer_na`), residual
RL (`residual`, `residual_ppo`), value-guided chunk selection (`value_guided`) and PPO through the base's own
sampling chain (`reinflow` for flow, `dppo` for diffusion: chain_ppo.py), and noise steering inside a learned world
model (`world_model`: world_model.py, whose rounds replace the online loop), on shared pieces:

    refined.py    RefinedPolicy: a frozen base plus the method's module, behind the ChunkPolicy runtime
    buffer.py     ReplayBuffer of chunk-level transitions
    collector.py  RewardSpec, the Method protocol and ChunkedCollector (chunked vector rollouts)
    online.py     AlgoConfig, EvalSchedule, run_online (the one loop every method runs) and its curves
    sac.py, ppo.py  the learners

Each method is one module (steer.py, residual.py, value_guidance.py) with its config dataclass (registered as
("algo", name)), its refined policy (registered with the policy registry, so `robopolicy.loading.load_policy`
rebuilds refined checkpoints) and `make_method(base, base_ref, algo, reward, seed) -> (method, buffer)`.
"""

from robopolicy.rl import dppo, reinflow, residual, steer, value_guidance, world_model
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec
from robopolicy.rl.refined import RefinedPolicy, save_refined
from robopolicy.rl.residual import ResidualPolicy
from robopolicy.rl.steer import SteerPolicy
from robopolicy.rl.value_guidance import ValueGuidedPolicy

# algo.name -> the module whose make_method builds it
METHODS = {"steer": steer, "steer_na": steer, "residual": residual, "residual_ppo": residual,
           "value_guided": value_guidance, "reinflow": reinflow, "dppo": dppo, "world_model": world_model}
# methods whose transitions are imagined: they run world_model.run_model_based instead of the online loop
MODEL_BASED = ("world_model",)

__all__ = ["METHODS", "MODEL_BASED", "RefinedPolicy", "ReplayBuffer", "ResidualPolicy", "RewardSpec", "SteerPolicy",
           "ValueGuidedPolicy", "save_refined"]
