"""The live view: a deployment (or a recorded store) logged to rerun, the viewer LeRobot users know.

`deploy view=true` hands the control node a `LiveView` beside its recorder: every tick logs the camera images,
the state, the requested and the sent action, and as text events the chunk boundaries (a new chunk taken into
use), holds (no action was due), safety events and watchdog states. It streams to a viewer when
`view_address` is given (`rerun --serve` or a running viewer's gRPC URL, e.g. rerun+http://127.0.0.1:9876/proxy)
and otherwise writes an .rrd file (`view_path`, default <out>/view.rrd; open it with `rerun FILE`).
`robopolicy data view store=...` logs a recorded store the same way (`log_store`).

Timelines: `tick` (control ticks over the whole run), `episode`, and `time` (seconds since the episode began).
rerun is imported only when a view is made: the robot computer's environment does not need it unless asked
(`pip install robopolicy[view]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.data.spec import IMAGE_PREFIX, OBSERVATION_PREFIX


class LiveViewError(RuntimeError):
    """rerun is missing or the view cannot be opened."""


class LiveView:
    """A frame sink (as `EpisodeRecorder`: start_episode / add_frame / finish_episode) logging to rerun."""

    def __init__(self, path: str | Path | None = None, address: str | None = None,
                 application_id: str = "robopolicy", image_every: int = 1) -> None:
        try:
            import rerun as rr
        except ImportError:
            raise LiveViewError("The live view needs rerun-sdk; install it with `pip install robopolicy[view]` "
                                "or drop view=true.") from None
        if path is None and address is None:
            raise LiveViewError("The live view needs an .rrd path or a viewer address.")
        self.rr, self.image_every = rr, max(int(image_every), 1)
        self.stream = rr.RecordingStream(application_id)
        if address:
            self.stream.connect_grpc(address)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.stream.save(str(path))
        self.path, self.address = path, address
        self.episode, self.tick = -1, 0
        self._t0: float | None = None
        self._chunk_t_obs = 0.0
        self._frame = 0

    # ------------------------------------------------------------------------------------------ frame sink
    def start_episode(self) -> None:
        self.episode += 1
        self._t0, self._chunk_t_obs, self._frame = None, 0.0, 0

    def add_frame(self, observation: dict[str, np.ndarray], *, requested: np.ndarray, sent: np.ndarray,
                  events: list, obs_timestamp: float, command_time: float, chunk_obs_timestamp: float,
                  inference_latency: float, obs_fresh: bool, watchdog: str, intervention: bool, success: bool,
                  held: bool = False) -> None:
        rr, log = self.rr, self.stream.log
        if self._t0 is None:
            self._t0 = command_time
        self._set_time(command_time - self._t0)
        self._log_observation(observation)
        log("action/requested", rr.Scalars(np.asarray(requested, dtype=np.float64).ravel()))
        log("action/sent", rr.Scalars(np.asarray(sent, dtype=np.float64).ravel()))
        if chunk_obs_timestamp != self._chunk_t_obs and chunk_obs_timestamp > 0:
            self._chunk_t_obs = chunk_obs_timestamp
            log("events/chunk", rr.TextLog(f"new chunk: observation {1e3 * (command_time - chunk_obs_timestamp):.0f} "
                                           f"ms old, inference {1e3 * inference_latency:.0f} ms"))
        if held:
            log("events/hold", rr.TextLog("hold: no action due", level="WARN"))
        for event in events:
            log("events/safety", rr.TextLog(_describe(event), level="WARN"))
        if watchdog != "ok":
            log("events/watchdog", rr.TextLog(f"watchdog {watchdog}", level="ERROR"))
        if intervention:
            log("events/intervention", rr.TextLog("a person commands the robot"))
        if not obs_fresh:
            log("events/stale_observation", rr.TextLog("observation too old for the policy", level="WARN"))
        self.tick += 1

    def finish_episode(self, *, task: str, success: bool, extra: dict | None = None) -> int | None:
        self.stream.log("events/episode", self.rr.TextLog(f"episode {self.episode} ({task}): success={success}"))
        self.stream.flush()
        return None

    def close(self) -> None:
        self.stream.flush()
        self.stream.disconnect()

    # ------------------------------------------------------------------------------------------ a store
    def log_store(self, store: Any, episodes: list[int] | None = None) -> dict[str, int]:
        """Log a recorded store's episodes (a deployment's: with requested actions, holds, chunk timing and
        safety counts; a demonstration store's: observations and actions). Returns {episodes, frames}."""
        rr, log = self.rr, self.stream.log
        frames = 0
        for index in range(store.num_episodes) if episodes is None else episodes:
            episode = store.get_episode(index)
            self.start_episode()
            n = len(episode["action"])
            command_time = episode.get("timing.command_time")
            chunk_t = episode.get("timing.chunk_obs_timestamp")
            for i in range(n):
                t = float(command_time[i, 0] - command_time[0, 0]) if command_time is not None else i / store.fps
                self._set_time(t)
                self._log_observation({k: v[i] for k, v in episode.items() if k.startswith(OBSERVATION_PREFIX)})
                log("action/sent", rr.Scalars(np.asarray(episode["action"][i], dtype=np.float64).ravel()))
                if "action.requested" in episode:
                    log("action/requested", rr.Scalars(np.asarray(episode["action.requested"][i], np.float64).ravel()))
                if chunk_t is not None and chunk_t[i, 0] > 0 and (i == 0 or chunk_t[i, 0] != chunk_t[i - 1, 0]):
                    log("events/chunk", rr.TextLog("new chunk"))
                if "action.held" in episode and bool(episode["action.held"][i, 0]):
                    log("events/hold", rr.TextLog("hold: no action due", level="WARN"))
                if "safety.events" in episode and int(episode["safety.events"][i, 0]):
                    log("events/safety", rr.TextLog(f"{int(episode['safety.events'][i, 0])} safety events",
                                                    level="WARN"))
                self.tick += 1
            meta = store.episodes[index]
            self.finish_episode(task=str(meta.get("task", "")), success=bool(meta.get("success")))
            frames += n
        return {"episodes": self.episode + 1, "frames": frames}

    # ------------------------------------------------------------------------------------------ helpers
    def _set_time(self, seconds: float) -> None:
        self.stream.set_time("tick", sequence=self.tick)
        self.stream.set_time("episode", sequence=self.episode)
        self.stream.set_time("time", duration=max(seconds, 0.0))

    def _log_observation(self, observation: dict[str, np.ndarray]) -> None:
        rr, log = self.rr, self.stream.log
        for key, value in observation.items():
            if key.startswith(IMAGE_PREFIX):
                if self._frame % self.image_every == 0:
                    log(f"camera/{key[len(IMAGE_PREFIX):]}", rr.Image(np.asarray(value)))
            elif key.startswith(OBSERVATION_PREFIX) and np.asarray(value).dtype.kind == "f":
                log(f"state/{key[len(OBSERVATION_PREFIX):]}", rr.Scalars(np.asarray(value, np.float64).ravel()))
        self._frame += 1


class FrameSinks:
    """Several frame sinks as one (the recorder and the live view); the first one's episode index is returned."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def start_episode(self) -> None:
        for sink in self.sinks:
            sink.start_episode()

    def add_frame(self, observation: dict[str, np.ndarray], **frame: Any) -> None:
        for sink in self.sinks:
            sink.add_frame(observation, **frame)

    def finish_episode(self, **kwargs: Any) -> int | None:
        indices = [sink.finish_episode(**kwargs) for sink in self.sinks]
        return indices[0]


def _describe(event: Any) -> str:
    """A `real.robot.safety.SafetyEvent` in words."""
    d = event.to_dict()
    return f"{d['kind']} (dims {d['dims']}) {d['detail']}".strip()
