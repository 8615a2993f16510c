"""The live view: `deploy view=true` and `data view` write rerun recordings; read back, they hold what ran."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import last_json, run_cli
from test_serve_deploy_cli import TASK, make_checkpoint

from robopolicy.data import DemoStore

rerun_chunk = pytest.importorskip("rerun.chunk")


def rows_per_entity(path) -> dict[str, int]:
    """Entity path -> logged rows, read back from an .rrd file with rerun's own reader."""
    rows: dict[str, int] = {}
    for chunk in rerun_chunk.RrdReader(path).stream().to_chunks():
        rows[str(chunk.entity_path)] = rows.get(str(chunk.entity_path), 0) + chunk.num_rows
    return rows


def test_deploy_view_logs_every_tick_and_data_view_replays_the_store(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "deploy"
    summary = last_json(run_cli("deploy", f"ckpt={ckpt}", f"task={TASK}", "episodes=2", f"out={out}",
                                "control.max_episode_s=2", "control.mode=sync", "inject_latency_s=0.1", "view=true",
                                check=True, timeout=300))
    assert summary["view"] == str(out / "view.rrd")
    store = DemoStore.open(out / "episodes")
    frames = store.num_frames
    rows = rows_per_entity(out / "view.rrd")
    # every tick: the state and the requested and sent actions
    assert rows["/state/state"] == rows["/action/requested"] == rows["/action/sent"] == frames
    # sync with 100 ms of latency holds while it waits for each chunk; every hold and every chunk is an event
    held = sum(int(store.get_episode(i)["action.held"].sum()) for i in range(store.num_episodes))
    assert rows["/events/hold"] == held == summary["counts"]["hold_ticks"] > 0
    assert 2 <= rows["/events/chunk"] <= summary["counts"]["chunks"]
    assert rows["/events/episode"] == 2

    replay = last_json(run_cli("data", "view", f"store={out / 'episodes'}", f"out={tmp_path / 'replay.rrd'}",
                               check=True, timeout=120))
    assert replay["episodes"] == 2 and replay["frames"] == frames
    replayed = rows_per_entity(tmp_path / "replay.rrd")
    assert replayed["/action/sent"] == replayed["/action/requested"] == replayed["/state/state"] == frames
    assert replayed["/events/hold"] == held and replayed["/events/chunk"] >= 2


def test_camera_images_and_safety_events_are_logged(tmp_path):
    from real.robot.live_view import LiveView
    from real.robot.safety import SafetyEvent, SafetyEventKind

    view = LiveView(tmp_path / "v.rrd", image_every=2)
    view.start_episode()
    for k in range(6):
        obs = {"observation.state": np.zeros(3, np.float32), "observation.images.front": np.zeros((8, 8, 3), np.uint8)}
        events = [SafetyEvent(SafetyEventKind.STEP_LIMIT, (0,), "clamped")] if k == 3 else []
        view.add_frame(obs, requested=np.ones(2), sent=np.zeros(2), events=events, obs_timestamp=k * 0.05,
                       command_time=k * 0.05, chunk_obs_timestamp=0.0, inference_latency=0.0, obs_fresh=True,
                       watchdog="hold" if k == 5 else "ok", intervention=False, success=False, held=False)
    view.finish_episode(task="t", success=False)
    view.close()
    rows = rows_per_entity(tmp_path / "v.rrd")
    assert rows["/camera/front"] == 3 and rows["/state/state"] == 6
    assert rows["/events/safety"] == 1 and rows["/events/watchdog"] == 1 and "/events/chunk" not in rows
