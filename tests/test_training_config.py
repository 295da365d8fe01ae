"""config_util (config files, variants, typed overrides), the stage entry point and train/train.py."""
import runpy
import sys
import textwrap
import types
from pathlib import Path

import ml_collections
import pytest

from dalle2_jax import config_util
from dalle2_jax.training import entry

CONFIG_FILE = textwrap.dedent('''
    import ml_collections

    def get_config(variant="base"):
        config = ml_collections.ConfigDict()
        config.variant = variant
        config.total_steps = 1000
        config.use_ema = True
        config.image_size = (64, 64)
        config.names = ("a", "b")
        config.note = None
        config.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-4, schedule="cosine"))
        return config
''')


@pytest.fixture()
def config_path(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.py").write_text(CONFIG_FILE)
    monkeypatch.chdir(tmp_path)
    return "configs/toy.py"


def test_variant_passed_through_or_omitted(config_path):
    assert config_util.load_config(config_path).variant == "base"  # get_config() called without argument
    assert config_util.load_config(f"{config_path}:tiny").variant == "tiny"
    assert config_util.load_config(f"{config_path}:").variant == ""


def test_overrides_parse_to_the_field_type(config_path):
    config = config_util.load_config(config_path, [
        "--config.total_steps=12", "--config.optimizer.learning_rate=3e-4", "--config.use_ema=false",
        "--config.image_size=(32, 48)", "--config.names=x,y,z", "config.optimizer.schedule=constant",
        "--config.note=[1, 2]", "--config.variant=paper"])
    assert config.total_steps == 12 and isinstance(config.total_steps, int)
    assert config.optimizer.learning_rate == 3e-4 and isinstance(config.optimizer.learning_rate, float)
    assert config.use_ema is False
    assert config.image_size == (32, 48)
    assert config.names == ("x", "y", "z")
    assert config.optimizer.schedule == "constant"
    assert config.note == [1, 2]
    assert config.variant == "paper"
    assert config_util.load_config(config_path, ["--config.optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0


@pytest.mark.parametrize("override, message", [
    ("--config.total_step=5", "unknown key 'total_step'"),
    ("--config.optimizer.lr=5", "unknown key 'optimizer.lr'"),
    ("--config.model.width=5", "unknown key 'model'"),
    ("--config.total_steps=1.5", "config.total_steps: expected an int"),
    ("--config.use_ema=maybe", "config.use_ema: expected a bool"),
    ("--config.image_size=(1, x)", "config.image_size: expected an int"),
    ("--config.optimizer=3", "group of settings"),
    ("--total_steps=5", "expected '--config.KEY=VALUE'"),
])
def test_bad_overrides_name_the_key(config_path, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_util.load_config(config_path, [override])


def test_config_found_relative_to_repository_root(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "toy.py").write_text(CONFIG_FILE)
    monkeypatch.setattr(config_util, "REPO_ROOT", repo)
    monkeypatch.chdir(tmp_path)
    assert config_util.load_config("configs/toy.py:x").variant == "x"
    with pytest.raises(FileNotFoundError, match="configs/missing.py"):
        config_util.load_config("configs/missing.py")
    with pytest.raises(ValueError, match="FILE.py"):
        config_util.load_config("configs/toy")
    (repo / "configs" / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        config_util.load_config("configs/empty.py")


def test_unknown_stage_lists_known_stages(config_path):
    config = config_util.load_config(config_path)
    for stage in ("nonexistent", "../clip", ""):
        with pytest.raises(ValueError, match=r"stage: expected one of \[.*'clip'.*'decoder'.*'prior'.*'upsampler'"):
            entry.make_task(stage, config)
    with pytest.raises(ValueError, match="workdir"):
        entry.run_train("clip", config_path, "", [])


def test_run_train_builds_the_stage_task_and_trains(config_path, monkeypatch, tmp_path):
    made, trained = [], []
    fake_stage = types.ModuleType("dalle2_jax.tasks.prior")
    fake_stage.make_task = lambda config: made.append(config) or "the prior task"
    monkeypatch.setitem(sys.modules, "dalle2_jax.tasks.prior", fake_stage)
    monkeypatch.setattr(entry.loop, "train", lambda task, config, workdir: trained.append((task, config, workdir)) or 7)
    result = entry.run_train("prior", f"{config_path}:tiny", str(tmp_path), ["--config.total_steps=3"])
    assert result == 7
    assert made[0].variant == "tiny" and made[0].total_steps == 3
    assert trained == [("the prior task", made[0], str(tmp_path))]


def test_train_script_rejects_stray_arguments(capsys):
    script = Path(__file__).resolve().parent.parent / "train" / "train.py"
    namespace = runpy.run_path(str(script))  # defines main() without running it
    with pytest.raises(SystemExit) as exit_info:
        namespace["main"](["prior", "--config", "configs/prior.py:tiny", "--workdir", "w", "--steps=3"])
    assert exit_info.value.code == 2
    assert "--steps=3" in capsys.readouterr().err
