"""World models learned from stores (demonstrations, rollouts, deployment recordings): a TD-MPC2-style latent
model with an ensemble of action-chunk dynamics heads, a reward head and a success classifier (model.py), trained
by `robopolicy world-model train` (train.py, data.py); imagined rollouts of a policy predict its success rate
without the simulator (imagine.py) and let `algo=world_model` refine a base inside the model (rl/world_model.py).
"""

from robopolicy.world_model.data import Episodes, load_episodes
from robopolicy.world_model.imagine import predict_success
from robopolicy.world_model.model import (
    WorldModel,
    WorldModelConfig,
    WorldModelError,
    load_world_model,
    read_world_model_info,
    save_world_model,
)

__all__ = ["Episodes", "WorldModel", "WorldModelConfig", "WorldModelError", "load_episodes", "load_world_model",
           "predict_success", "read_world_model_info", "save_world_model"]
