"""Online refinement of a frozen base policy in simulation: latent-noise steering (`steer`, `steer_na`), residual
RL (`residual`) and value-guided chunk selection (`value_guided`), on the shared pieces in `core`.

Importing this package registers the refined policies with the policy registry, so `load_policy` rebuilds
refined checkpoints (it imports this package when a checkpoint names a policy it does not know yet).
"""

from robopolicy.rl.core import RefinedPolicy, ReplayBuffer, base_reference, save_refined
from robopolicy.rl.residual import ResidualPolicy
from robopolicy.rl.steer import SteerPolicy
from robopolicy.rl.value_guidance import ValueGuidedPolicy

__all__ = ["RefinedPolicy", "ReplayBuffer", "ResidualPolicy", "SteerPolicy", "ValueGuidedPolicy", "base_reference",
           "save_refined"]
