"""Offscreen rendering of MuJoCo scenes with the settings that make software GL fast.

The GL backend is picked here (MUJOCO_GL=egl unless set, osmesa when EGL cannot start) and the context is
created directly, so it works even when `mujoco` was imported before MUJOCO_GL was set. The expensive
defaults (shadow maps, multisampling, reflections) are switched off before the GPU context exists:
software GL is 10-30x slower with them.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402


def _gl_context(width: int, height: int):
    """A current offscreen GL context from MUJOCO_GL's backend, falling back to osmesa when EGL fails."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    if backend == "egl":
        try:
            from mujoco.egl import GLContext

            ctx = GLContext(width, height)
            ctx.make_current()
            return ctx
        except Exception:  # no EGL device or library: software osmesa still works headless
            os.environ["MUJOCO_GL"] = backend = "osmesa"
    if backend == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
        from mujoco.osmesa import GLContext
    else:
        from mujoco.glfw import GLContext
    ctx = GLContext(width, height)
    ctx.make_current()
    return ctx


def apply_fast_settings(model: mujoco.MjModel) -> None:
    """Disable shadow maps and multisampling on the model (must happen before a renderer is created)."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0


class OffscreenRenderer:
    """Renders named cameras of one model to uint8 [H, W, 3] RGB arrays."""

    def __init__(self, model: mujoco.MjModel, height: int = 96, width: int = 96, max_geom: int = 500):
        apply_fast_settings(model)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        self.model, self.height, self.width = model, height, width
        self._gl = _gl_context(width, height)
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=max_geom)
        self._option = mujoco.MjvOption()
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._viewport = mujoco.MjrRect(0, 0, width, height)
        self._pixels = np.empty((height, width, 3), dtype=np.uint8)

    def camera_id(self, name: str) -> int:
        cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        if cam_id < 0:
            names = [self.model.camera(i).name for i in range(self.model.ncam)]
            raise ValueError(f"Unknown camera {name!r}: this scene has cameras {names}.")
        return cam_id

    def render(self, data: mujoco.MjData, camera_id: int) -> np.ndarray:
        """One RGB image [H, W, 3] uint8 (a new array) from camera `camera_id` for data's current state."""
        self._gl.make_current()
        self._camera.fixedcamid = camera_id
        mujoco.mjv_updateScene(
            self.model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene
        )
        mujoco.mjr_render(self._viewport, self._scene, self._context)
        mujoco.mjr_readPixels(self._pixels, None, self._viewport, self._context)
        return self._pixels[::-1].copy()  # GL rows go bottom-up

    def close(self) -> None:
        if self._gl is not None:
            self._context.free()
            self._gl.free()
            self._gl = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the GL library may already be gone
            pass
