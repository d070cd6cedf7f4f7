import pytest

from pipeline.config import Config, ConfigError, load_config, presets


def test_presets_load_and_differ():
    assert {"tiny", "paper"} <= set(presets())
    tiny, paper = load_config("tiny"), load_config("paper")
    assert isinstance(tiny, Config)
    assert tiny.prepare.rows_per_file != paper.prepare.rows_per_file
    assert paper.features.n_mels == 128 and paper.features.n_frames == 3000


def test_overrides_are_typed_and_dotted():
    cfg = load_config("tiny", ["prepare.rows_per_file=7", "prepare.splits=[dev]", "prepare.max_duration_s=20",
                               "prepare.max_down_votes=null"])
    assert cfg.prepare.rows_per_file == 7
    assert cfg.prepare.splits == ["dev"]
    assert cfg.prepare.max_duration_s == 20.0 and isinstance(cfg.prepare.max_duration_s, float)
    assert cfg.prepare.max_down_votes is None
    assert load_config("tiny", ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize("override, message", [
    ("prepare.rows_per_fil=3", "prepare.rows_per_fil"),
    ("prepare.rows_per_file=many", "prepare.rows_per_file: expected int"),
    ("prepare.splits=train", "prepare.splits: expected a list"),
    ("nosuch.key=1", "nosuch"),
    ("prepare.rows_per_file", "not of the form"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_yaml_file_and_unknown_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("prepare:\n  limit: 5\n")
    assert load_config(str(path)).prepare.limit == 5
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")
