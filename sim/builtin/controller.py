"""Damped-least-squares differential IK: an end-effector position delta -> arm joint position targets.

The orientation is held at a fixed "gripper pointing down" frame, so the task space is 6-D (position +
orientation error) and the 7th DoF is spent in the null space pulling the arm towards its home posture.
Everything is preallocated: one call is a Jacobian (mj_jacSite), a 6x6 solve and a few small products.
"""

from __future__ import annotations

import mujoco
import numpy as np

from sim.builtin.scene import ARM_JOINTS


class DiffIKController:
    """Turns a desired end-effector displacement into joint position targets for the arm's position servos."""

    def __init__(
        self, model: mujoco.MjModel, site: str = "grip", damping: float = 0.02, nullspace_gain: float = 0.1
    ):
        self.model = model
        self.site_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site)
        joint_ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, j) for j in ARM_JOINTS]
        self.qpos_adr = np.array([model.jnt_qposadr[j] for j in joint_ids])
        self.dof_adr = np.array([model.jnt_dofadr[j] for j in joint_ids])
        self.joint_low = model.jnt_range[joint_ids, 0].copy()
        self.joint_high = model.jnt_range[joint_ids, 1].copy()
        self.nullspace_gain = nullspace_gain
        self.home_qpos = np.zeros(7)
        self.target_rot = np.eye(3)  # site frame to hold, rows are world axes: set by set_home
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))
        self._jac = np.zeros((6, 7))
        self._rhs = np.zeros((6, 2))
        self._damping_eye = damping**2 * np.eye(6)

    def set_home(self, home_qpos: np.ndarray, target_rot: np.ndarray) -> None:
        self.home_qpos[:] = home_qpos
        self.target_rot[:] = target_rot

    def joint_targets(self, data: mujoco.MjData, pos_delta: np.ndarray) -> np.ndarray:
        """Joint targets [7] that move the site by `pos_delta` [3] (metres) and restore its orientation.

        Needs data's kinematics (site_xpos / site_xmat) to be current for data.qpos.
        """
        q = data.qpos[self.qpos_adr]
        mujoco.mj_jacSite(self.model, data, self._jacp, self._jacr, self.site_id)
        self._jac[:3] = self._jacp[:, self.dof_adr]
        self._jac[3:] = self._jacr[:, self.dof_adr]
        # Orientation error as a rotation vector (small-angle): 0.5 * sum_i cur_i x des_i over the frame
        # axes, read off the antisymmetric part of M = R_cur R_des^T.
        m = data.site_xmat[self.site_id].reshape(3, 3) @ self.target_rot.T
        err = self._rhs
        err[:3, 0] = pos_delta
        err[3, 0] = 0.5 * (m[1, 2] - m[2, 1])
        err[4, 0] = 0.5 * (m[2, 0] - m[0, 2])
        err[5, 0] = 0.5 * (m[0, 1] - m[1, 0])
        # dq = J^T (J J^T + lambda^2 I)^-1 err, plus the home-posture pull projected into J's null space;
        # both right-hand sides go through one solve.
        jac = self._jac
        jjt = jac @ jac.T + self._damping_eye
        pull = self.nullspace_gain * (self.home_qpos - q)
        err[:, 1] = jac @ pull
        sol = np.linalg.solve(jjt, err)
        dq = jac.T @ (sol[:, 0] - sol[:, 1]) + pull
        return np.clip(q + dq, self.joint_low, self.joint_high)

    def solve(self, data: mujoco.MjData, target_pos: np.ndarray, iterations: int = 100) -> np.ndarray:
        """Iterate to joint positions that put the site at `target_pos` (used once, to find the home posture)."""
        for _ in range(iterations):
            mujoco.mj_kinematics(self.model, data)
            mujoco.mj_comPos(self.model, data)
            delta = target_pos - data.site_xpos[self.site_id]
            data.qpos[self.qpos_adr] = self.joint_targets(data, delta)
        mujoco.mj_kinematics(self.model, data)
        return data.qpos[self.qpos_adr].copy()
