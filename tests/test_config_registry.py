"""The YAML in configs/ and the typed configs cannot disagree: every file's keys and defaults match its registered
dataclass. A bad setting on the command line is one sentence naming the key, and --help shows each field's doc."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from robopolicy import cli
from robopolicy.config import CONFIGS, ConfigError, from_mapping, yaml_mismatches

NOT_FIELDS = ("_target_", "defaults")
YAML_FILES = sorted(str(p.relative_to(cli.CONFIG_DIR)) for p in cli.CONFIG_DIR.rglob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Import every module that registers a config: the commands', the policies', the algorithms', the robots'."""
    for module in sorted({*cli.CONFIG_MODULES.values(), *cli.GROUP_MODULES.values()}):
        importlib.import_module(module)


def composed(config_name: str) -> dict:
    """The file with its `defaults:` list applied, interpolations left as written."""
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=config_name), resolve=False)


@pytest.mark.parametrize("path", YAML_FILES)
def test_yaml_agrees_with_its_typed_config(path):
    file = Path(path)
    if file.parent == Path("."):  # configs/<command>.yaml, less the sections its groups fill
        command = file.stem
        yaml, key = composed(command), ("command", command)
        skip = (*cli.command_groups(command), *NOT_FIELDS)
    else:  # configs/<group>/<option>.yaml
        group, option = file.parent.name, file.stem
        yaml = composed(f"{group}/{option}")[group]
        key, skip = (group, cli.group_config_name(group, option, yaml)), NOT_FIELDS
    assert key in CONFIGS, f"configs/{path} has no typed config: register one with @register_config{key}."
    cls = CONFIGS[key]
    if key[1] != file.stem and key[0] != "command":
        # A preset of another config (policy/flow_image.yaml is `name: flow` with other values): every key must
        # be a field and every value of its type; its values are not the defaults.
        try:
            from_mapping(cls, {k: v for k, v in yaml.items() if k not in skip}, key[0])
        except ConfigError as e:
            pytest.fail(f"configs/{path}: {e}")
        return
    problems = yaml_mismatches(cls, yaml, skip=skip)
    assert not problems, f"configs/{path} disagrees with {cls.__name__}: " + "; ".join(problems)


@pytest.mark.parametrize("args, key", [
    (["collect", "episodes=many"], "episodes"),
    (["collect", "+episodez=3"], "episodez"),
    (["collect", "episodez=3"], "episodez"),
    (["collect", "expert.noise=loud"], "expert.noise"),
    (["collect", "source=robot"], "source"),
    (["train", "data=DATA", "optim.lr=fast"], "optim.lr"),
    (["eval", "ckpt=CKPT", "threads=two"], "threads"),
    (["data", "info", "store=STORE", "min_quality=high"], "min_quality"),
    (["quickstart", "refine.env_steps=lots"], "refine.env_steps"),
])
def test_a_bad_setting_exits_2_with_one_sentence_naming_the_key(args, key, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main([*args, f"out={out}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "a refused command must not write anything"


def test_a_missing_required_setting_names_it(capsys):
    assert cli.main(["train", "data=somewhere"]) == 2
    assert "needs out=" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["collect", "data", "train", "eval", "quickstart"])
def test_help_shows_every_setting_with_its_doc(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    cls = cli.command_config_class(command)

    def check(cls: type, indent: str) -> None:
        for f in dataclasses.fields(cls):
            line = next((ln for ln in text.splitlines() if ln.startswith(f"{indent}{f.name}:")), None)
            assert line is not None, f"{indent}{f.name} is missing from `robopolicy {command} --help`"
            assert f.metadata["doc"] and f.metadata["doc"] in line, f"{f.name} is shown without its doc"
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                check(type(f.default_factory()), indent + "  ")

    check(cls, "")
    for group in cli.command_groups(command):
        assert f"\n{group}: " in text, f"the {group} section is missing from `robopolicy {command} --help`"
