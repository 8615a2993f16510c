"""Every robot driver's config, registered as ("robot", <name>) on import, and their errors.

`robopolicy deploy robot=<name>` and `python -m real.robot --robot <name>` import this module to find the
drivers; each driver imports its vendor client only when it connects, so this imports numpy + msgpack only.
"""

from __future__ import annotations

from real.robot.franka import FrankaConfig, FrankaError
from real.robot.lerobot_arm import KochConfig, LeRobotArmError, SO100Config, SO101Config
from real.robot.sim_robot import SimRobotConfig, SimRobotError
from real.robot.ur import URConfig, URError

ROBOT_CONFIGS = {"sim": SimRobotConfig, "ur": URConfig, "franka": FrankaConfig, "so100": SO100Config,
                 "so101": SO101Config, "koch": KochConfig}
ROBOT_ERRORS: tuple[type[Exception], ...] = (SimRobotError, URError, FrankaError, LeRobotArmError)
