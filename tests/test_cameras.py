"""Cameras behind the HAL: threaded OpenCV capture from a generated video file (timestamps, pacing, dropped-frame
counts, RGB order, looping, errors), RealSense when pyrealsense2 is installed."""

from __future__ import annotations

import importlib.util
import time

import cv2
import numpy as np
import pytest

from real.robot.cameras import CameraError, OpenCVCamera, RealSenseCamera, camera_features, make_cameras

FPS, N_FRAMES, SIZE = 30, 30, (64, 48)  # (width, height)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 1 s MJPG video whose frame i is grey level 8 i, with a pure red square (BGR order on disk)."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    for i in range(N_FRAMES):
        frame = np.full((SIZE[1], SIZE[0], 3), 8 * i, dtype=np.uint8)
        frame[:16, :16] = (0, 0, 255)  # red in BGR
        writer.write(frame)
    writer.release()
    return str(path)


def index_of(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]  # the grey part, away from the red square in the corner
    return int(round(float(frame[h // 2:, w // 2:].mean()) / 8))


def test_frames_are_paced_timestamped_and_rgb(video):
    with OpenCVCamera("front", video) as camera:
        start = time.monotonic()
        frame, t0 = camera.read()
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        red = frame[:16, :16].reshape(-1, 3).mean(axis=0)
        assert red[0] > 200 and red[2] < 60  # RGB: red first
        time.sleep(0.5)
        frame, t1 = camera.read()
        assert t0 < t1 <= time.monotonic() and t1 - start < 0.7
        # played at the file's 30 fps, as a camera delivers it (generous bounds: a loaded 2-core machine)
        assert 8 <= camera.frames <= 20, camera.stats
        assert abs(index_of(frame) - (camera.frames - 1)) <= 1


def test_a_slow_reader_counts_dropped_frames(video):
    with OpenCVCamera("front", video, width=32, height=24) as camera:
        indices, stamps = [], []
        for _ in range(5):
            frame, stamp = camera.read()
            deadline = time.monotonic() + 2.0  # a loaded machine may deliver the next frame late
            while stamps and stamp <= stamps[-1] and time.monotonic() < deadline:
                time.sleep(0.01)
                frame, stamp = camera.read()
            assert frame.shape == (24, 32, 3)
            indices.append(index_of(frame))
            stamps.append(stamp)
            time.sleep(0.12)
        assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))
        assert all(b > a for a, b in zip(indices, indices[1:], strict=False))  # always the newest frame
        stats = camera.stats
        assert stats["dropped"] >= stats["frames"] - stats["reads"] - 1 and stats["dropped"] > 5


def test_a_file_ends_or_loops(video):
    with OpenCVCamera("front", video, fps=200) as camera:
        time.sleep(0.5)
        assert camera.frames == N_FRAMES and "ended" in camera.stats["error"]
        frame, _ = camera.read()  # the last frame stays readable; its timestamp shows its age
        assert index_of(frame) == N_FRAMES - 1
    with OpenCVCamera("front", video, fps=200, loop=True) as camera:
        time.sleep(0.5)
        assert camera.frames > N_FRAMES


def test_bad_sources_and_settings_are_one_sentence(tmp_path):
    with pytest.raises(CameraError, match="cannot open source"):
        OpenCVCamera("front", str(tmp_path / "missing.avi")).connect()
    with pytest.raises(CameraError, match="type"):
        make_cameras({"front": {"type": "webcam"}})
    with pytest.raises(CameraError, match="width and height"):
        camera_features(make_cameras({"front": {"source": 0}}))
    cameras = make_cameras({"front": {"source": 0, "width": 96, "height": 96}})
    assert camera_features(cameras)["observation.images.front"]["shape"] == [96, 96, 3]


@pytest.mark.skipif(importlib.util.find_spec("pyrealsense2") is None, reason="pyrealsense2 is not installed")
def test_realsense_without_a_device_is_one_sentence():
    with pytest.raises(CameraError, match="cannot start"):
        RealSenseCamera("wrist").connect()


def test_an_arm_driver_records_its_cameras(video):
    from real.host.ur_standin import URStandin
    from real.robot.ur import URRobot

    standin = URStandin("ur5e", realtime=False)
    cameras = {"front": {"type": "opencv", "source": video, "width": 32, "height": 24, "loop": True}}
    try:
        with URRobot(vendor=standin, cameras=cameras) as robot:
            assert robot.observation_features["observation.images.front"]["shape"] == [24, 32, 3]
            obs = robot.reset()
            assert obs["observation.images.front"].shape == (24, 32, 3)
            camera = robot._cameras["front"]
            assert camera.is_connected
        assert not camera.is_connected
    finally:
        standin.close()
