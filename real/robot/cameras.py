"""Cameras behind the HAL's `Camera`: OpenCV (V4L2 devices, video files, streams: any `cv2.VideoCapture`
source) and Intel RealSense (pyrealsense2), each captured on its own thread.

A capture thread keeps only the newest frame, stamped with time.monotonic() when it was captured, so `read()`
never blocks the control loop on the device and always hands out the latest image with its age. Counters:
`frames` (captured), `dropped` (captured but replaced before anyone read them, plus frames the device itself
skipped: RealSense frame-number gaps, failed grabs), `reads`. A video file is played at its own frame rate, as a
camera would deliver it (`loop=true` to start over at its end). Frames are uint8 RGB [H, W, 3], resized to
`height` x `width` when given. `make_cameras({"front": {"type": "opencv", "source": 0}, ...})` builds a robot's.
numpy + standard library; cv2 / pyrealsense2 are imported when a camera connects.
"""

from __future__ import annotations

import importlib
import threading
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from real.robot.hal import Camera


class CameraError(RuntimeError):
    """A camera cannot be opened or stopped delivering frames (one sentence naming it)."""


class ThreadedCamera(Camera):
    """The capture thread, latest-frame slot and counters shared by every camera type."""

    def __init__(self, name: str, width: int | None = None, height: int | None = None,
                 timeout_s: float = 2.0) -> None:
        self.name, self.width, self.height, self.timeout_s = name, width, height, float(timeout_s)
        self.frames = self.dropped = self.reads = 0
        self._latest: tuple[np.ndarray, float] | None = None
        self._unread = False
        self._error: str | None = None
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def connect(self) -> None:
        if self._thread is not None:
            return
        self._open()
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        self.read()  # the first frame, or a clear error now rather than in the control loop

    def disconnect(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._close()

    def read(self) -> tuple[np.ndarray, float]:
        """The newest frame uint8 [H, W, 3] and its capture time; waits (up to timeout_s) only for the first."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._latest is not None or self._error is not None, self.timeout_s):
                raise CameraError(f"Camera {self.name!r} delivered no frame within {self.timeout_s} s.")
            if self._latest is None:
                raise CameraError(f"Camera {self.name!r} failed: {self._error}")
            self.reads += 1
            self._unread = False
            return self._latest

    @property
    def stats(self) -> dict[str, Any]:
        return {"frames": self.frames, "dropped": self.dropped, "reads": self.reads, "error": self._error}

    def _publish(self, frame: np.ndarray, timestamp: float) -> None:
        if self.width and self.height and frame.shape[:2] != (self.height, self.width):
            frame = _resize(frame, self.height, self.width)
        with self._cv:
            self.dropped += self._unread  # the previous frame was never read
            self._latest, self._unread = (np.ascontiguousarray(frame, dtype=np.uint8), timestamp), True
            self.frames += 1
            self._cv.notify_all()

    def _fail(self, message: str) -> None:
        with self._cv:
            self._error = message
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._capture():
                    return
        except Exception as exc:  # a device failing must not kill the process: read() reports it
            self._fail(f"{type(exc).__name__}: {exc}")

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _capture(self) -> bool:
        """Capture one frame and `_publish` it; False ends the thread (the source is exhausted)."""

    @abstractmethod
    def _close(self) -> None: ...


class OpenCVCamera(ThreadedCamera):
    """Any `cv2.VideoCapture` source: a device index (V4L2), a device path, a video file or a stream URL."""

    def __init__(self, name: str = "camera", source: int | str = 0, *, width: int | None = None,
                 height: int | None = None, fps: float | None = None, loop: bool = False,
                 timeout_s: float = 2.0) -> None:
        super().__init__(name, width, height, timeout_s)
        self.source, self.fps, self.loop = source, fps, loop
        self._cap: Any = None
        self._is_file = isinstance(source, str) and Path(source).is_file()
        self._next_due = 0.0

    def _open(self) -> None:
        cv2 = _import("cv2", "OpenCV cameras need opencv: pip install 'robopolicy[camera]'")
        self._cv2 = cv2
        cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            raise CameraError(f"Camera {self.name!r} cannot open source {self.source!r}; check the device index "
                              "or path (ls /dev/video*) and that no other program holds it.")
        if self.fps and not self._is_file:
            cap.set(cv2.CAP_PROP_FPS, float(self.fps))
        # a file plays at its own rate unless fps says otherwise
        rate = self.fps or (cap.get(cv2.CAP_PROP_FPS) if self._is_file else 0.0)
        self._period = 1.0 / rate if self._is_file and rate > 0 else 0.0
        self._next_due = time.monotonic()
        self._cap = cap

    def _capture(self) -> bool:
        if self._period:  # pace a file like a live camera
            delay = self._next_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next_due = max(self._next_due + self._period, time.monotonic() - self._period)
        ok, frame = self._cap.read()
        timestamp = time.monotonic()
        if not ok:
            if self._is_file and self.loop:
                self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
                return True
            if self._is_file:
                self._fail(f"the video file {self.source} ended")
                return False
            self.dropped += 1  # a failed grab on a live device
            time.sleep(0.005)
            return True
        self._publish(frame[:, :, ::-1], timestamp)  # BGR -> RGB
        return True

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class RealSenseCamera(ThreadedCamera):
    """An Intel RealSense colour stream (pyrealsense2); frame-number gaps count as dropped frames."""

    def __init__(self, name: str = "realsense", serial: str | None = None, *, width: int = 640, height: int = 480,
                 fps: int = 30, resize: tuple[int, int] | None = None, timeout_s: float = 2.0) -> None:
        super().__init__(name, *(resize[::-1] if resize else (None, None)), timeout_s)
        self.serial, self.stream = serial, (int(width), int(height), int(fps))
        self._pipeline: Any = None
        self._last_number: int | None = None

    def _open(self) -> None:
        rs = _import("pyrealsense2", "RealSense cameras need pyrealsense2: pip install 'robopolicy[realsense]'")
        config = rs.config()
        if self.serial:
            config.enable_device(self.serial)
        width, height, fps = self.stream
        config.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        pipeline = rs.pipeline()
        try:
            pipeline.start(config)
        except RuntimeError as exc:
            raise CameraError(f"RealSense camera {self.name!r} ({self.serial or 'any'}) cannot start ({exc}).") from None
        self._pipeline = pipeline

    def _capture(self) -> bool:
        frames = self._pipeline.wait_for_frames(int(self.timeout_s * 1000))
        timestamp = time.monotonic()
        color = frames.get_color_frame()
        if not color:
            self.dropped += 1
            return True
        number = color.get_frame_number()
        if self._last_number is not None and number > self._last_number + 1:
            self.dropped += number - self._last_number - 1
        self._last_number = number
        self._publish(np.asanyarray(color.get_data()).copy(), timestamp)
        return True

    def _close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
            self._pipeline = None


CAMERA_TYPES = {"opencv": OpenCVCamera, "realsense": RealSenseCamera}


def make_cameras(specs: dict[str, dict] | None) -> dict[str, ThreadedCamera]:
    """Cameras by name from config: `{"front": {"type": "opencv", "source": 0, "width": 96, "height": 96}}`."""
    cameras = {}
    for name, spec in (specs or {}).items():
        spec = dict(spec)
        kind = spec.pop("type", "opencv")
        if kind not in CAMERA_TYPES:
            raise CameraError(f"Camera {name!r} has type {kind!r}; choose one of {sorted(CAMERA_TYPES)}.")
        try:
            cameras[name] = CAMERA_TYPES[kind](name, **spec)
        except TypeError as exc:
            raise CameraError(f"Camera {name!r}: {exc}.") from None
    return cameras


def camera_features(cameras: dict[str, ThreadedCamera]) -> dict[str, dict]:
    """Feature specs of the cameras' images (`observation.images.<name>`); they need a fixed width and height."""
    features = {}
    for name, camera in cameras.items():
        if not (camera.width and camera.height):
            raise CameraError(f"Camera {name!r} needs width and height (the size its images are recorded at).")
        features[f"observation.images.{name}"] = {"dtype": "uint8", "shape": [camera.height, camera.width, 3],
                                                  "names": ["height", "width", "channel"]}
    return features


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize in numpy (no OpenCV needed for RealSense)."""
    rows = (np.arange(height) * frame.shape[0] / height).astype(int)
    cols = (np.arange(width) * frame.shape[1] / width).astype(int)
    return frame[rows][:, cols]


def _import(module: str, hint: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CameraError(f"{hint}.") from None


def read_images(cameras: dict[str, Camera]) -> dict[str, np.ndarray]:
    """The newest image of each camera, keyed `observation.images.<name>` (a robot driver's observation)."""
    return {f"observation.images.{name}": camera.read()[0] for name, camera in cameras.items()}


def connect_all(cameras: dict[str, Camera]) -> None:
    """Connect every camera, or none: a failure disconnects those already started and raises."""
    started = []
    try:
        for camera in cameras.values():
            camera.connect()
            started.append(camera)
    except BaseException:
        disconnect_all(started)
        raise


def disconnect_all(cameras: dict[str, Camera] | list[Camera]) -> None:
    for camera in cameras.values() if isinstance(cameras, dict) else cameras:
        camera.disconnect()
