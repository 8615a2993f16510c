"""The console script as a user meets it: help, bad commands and settings, missing files."""

import json

from conftest import last_json


def test_help_lists_commands(cli):
    proc = cli("--help", check=True)
    for command in ("collect", "data", "train", "eval", "quickstart"):
        assert command in proc.stdout


def test_command_help_shows_its_configuration(cli):
    proc = cli("collect", "--help", check=True)
    assert "episodes:" in proc.stdout and "expert:" in proc.stdout and "key=value" in proc.stdout
    proc = cli("train", "--help", check=True)
    assert "batch_size:" in proc.stdout and "policy" in proc.stdout


def test_unknown_command_fails_with_one_line(cli):
    proc = cli("fly")
    assert proc.returncode != 0
    assert "unknown command 'fly'" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_setting_is_named(cli, tmp_path):
    proc = cli("collect", "task=builtin/reach", f"out={tmp_path / 's'}", "episodez=3")
    assert proc.returncode != 0 and "episodez" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_missing_required_setting(cli):
    proc = cli("collect", "task=builtin/reach")
    assert proc.returncode != 0 and "out=" in proc.stderr


def test_unknown_task(cli, tmp_path):
    proc = cli("collect", "task=builtin/fly", f"out={tmp_path / 's'}", "episodes=1")
    assert proc.returncode != 0 and "fly" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_data_commands_on_missing_store(cli, tmp_path):
    for sub in ("info", "validate", "stats"):
        proc = cli("data", sub, f"store={tmp_path / 'nothing'}")
        assert proc.returncode != 0 and "nothing" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("data", "frobnicate", "store=x")
    assert proc.returncode != 0 and "info" in proc.stderr


def test_collect_metaworld_then_inspect(cli, tmp_path):
    store = tmp_path / "mw_push"
    proc = cli("collect", "task=metaworld/push-v3", "episodes=3", f"out={store}", check=True)
    summary = last_json(proc)
    assert summary["episodes"] == 3 and summary["success_rate"] == 1.0
    info = last_json(cli("data", "info", f"store={store}", check=True))
    assert info["episodes"] == 3 and info["features"]["observation.state"]["shape"] == [39]
    assert info["sources"] == {"expert": 3}
    assert last_json(cli("data", "validate", f"store={store}", check=True))["valid"] is True
    stats = last_json(cli("data", "stats", f"store={store}", check=True))["stats"]
    assert len(stats["action"]["mean"]) == 4
    # Appending to an existing store with other features is refused and changes nothing.
    before = json.dumps(info)
    proc = cli("collect", "task=builtin/reach", "episodes=1", f"out={store}")
    assert proc.returncode != 0 and "features" in proc.stderr
    assert json.dumps(last_json(cli("data", "info", f"store={store}", check=True))) == before


def test_data_export_import_quality_filter_through_the_cli(cli, tmp_path):
    store, exported, back = tmp_path / "push", tmp_path / "lerobot", tmp_path / "back"
    cli("collect", "task=builtin/push", "episodes=4", f"out={store}", check=True)
    cli("collect", "task=builtin/push", "episodes=4", f"out={store}", "expert.sloppy=true",
        "expert.noise=0.3", check=True)
    out = last_json(cli("data", "export", f"store={store}", f"out={exported}", check=True))
    assert (exported / "meta" / "info.json").exists() and out["command"] == "data export"
    imported = last_json(cli("data", "import", "format=lerobot", f"src={exported}", f"out={back}", check=True))
    assert imported["command"] == "data import"
    assert last_json(cli("data", "info", f"store={back}", check=True))["episodes"] == 8
    report = last_json(cli("data", "quality", f"store={store}", f"out={tmp_path / 'q'}", check=True))
    assert (tmp_path / "q" / "report.png").exists() and report["command"] == "data quality"
    kept = last_json(cli("data", "filter", f"store={store}", f"out={tmp_path / 'f'}", "min_quality=0.0",
                         check=True))
    assert kept["command"] == "data filter"
    assert last_json(cli("data", "info", f"store={tmp_path / 'f'}", check=True))["episodes"] == 8
    # Importing over an existing store without overwrite=true is refused and keeps it intact.
    proc = cli("data", "import", "format=lerobot", f"src={exported}", f"out={back}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_json(cli("data", "info", f"store={back}", check=True))["episodes"] == 8


def test_collect_with_images_stores_frames_that_show_the_scene(cli, tmp_path):
    from robopolicy.data import DemoStore

    store = tmp_path / "push_img"
    summary = last_json(cli("collect", "task=builtin/push", "episodes=2", f"out={store}", "obs.images=true",
                            check=True))
    assert summary["success_rate"] == 1.0
    s = DemoStore.open(store)
    [key] = [k for k in s.features if k.startswith("observation.images.")]
    frames = s.get_episode(0)[key]
    assert frames.shape[1:] == (96, 96, 3) and frames.dtype.name == "uint8"
    assert frames[0].std() > 10, "the first image is blank"
    moved = abs(frames[-1].astype(int) - frames[0].astype(int)).mean()
    assert moved > 1.0, "images must change as the arm moves"


def test_validate_names_a_truncated_chunk_and_edited_metadata(cli, tmp_path):
    store = tmp_path / "s"
    cli("collect", "task=builtin/reach", "episodes=3", f"out={store}", check=True)
    chunk = next(p for p in sorted((store / "data" / "action").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-7])
    proc = cli("data", "validate", f"store={store}")
    assert proc.returncode != 0 and "action" in proc.stderr and "Traceback" not in proc.stderr

    store2 = tmp_path / "s2"
    cli("collect", "task=builtin/reach", "episodes=3", f"out={store2}", check=True)
    meta = store2 / "zarr.json"
    text = meta.read_text()
    doc = json.loads(text)
    attrs = doc["attributes"]
    key = next(k for k in attrs if isinstance(attrs[k], dict) and "observation.state" in attrs[k])
    del attrs[key]["observation.state"]
    meta.write_text(json.dumps(doc))
    proc = cli("data", "validate", f"store={store2}")
    assert proc.returncode != 0 and "observation.state" in proc.stderr
