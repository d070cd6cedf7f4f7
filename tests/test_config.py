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


@pytest.mark.parametrize("override, message", [
    ("model.trainable=[queries, encoder]", "model.trainable[1]: 'encoder' is not one of 'queries', 'qformer', "
                                           "'projection'"),
    ("model.projection_init=zeros", "model.projection_init: 'zeros' is not one of 'default', 'mean_embedding'"),
    ("teacher.padding_side=middle", "teacher.padding_side: 'middle' is not one of 'left', 'right'"),
    ("train.device=tpu", "train.device: 'tpu' is not one of 'cpu', 'cuda', 'xla'"),
    ("train.align_reduction=mean", "train.align_reduction: 'mean' is not one of 'sum', 'token_mean'"),
    ("eval.label_score=max", "eval.label_score: 'max' is not one of 'sum', 'mean'"),
    ("eval.dtype=int8", "eval.dtype: 'int8' is not one of 'float32', 'bfloat16', 'float16'"),
    ("eval.num_actors=0", "eval.num_actors must be >= 1"),
    ("train.w_kl=0.5", "train.w_kl=0.5 needs the teacher's top-k"),
    ("prepare.rows_per_task=0", "prepare.rows_per_task and prepare.rows_per_file must be >= 1"),
    ("train.log_every=0", "train.log_every=0: must be >= 1"),  # else a ZeroDivisionError in every worker
    ("train.dtype=bfloat16", r"train.dtype=bfloat16 is the FSDP2 backend's mixed precision .* train.dtype=float32"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
])
def test_choices_are_checked_once_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("tiny", [override])


def test_overrides_follow_a_jobs_positional_and_mix_with_flags(monkeypatch):
    """A job with a positional (jobs.curve's run directory, jobs.plot's): overrides come after it, with or without
    flags between, and never take its place (they once did when they came last: `run` got the override)."""
    from jobs import _common

    for argv in (["runs/x/train", "--mels", "m", "eval.max_questions=8", "--config", "small", "eval.split=dev"],
                 ["--config", "small", "runs/x/train", "eval.max_questions=8", "--mels", "m", "eval.split=dev"]):
        p = _common.parser("t")
        p.add_argument("run")
        p.add_argument("--mels", required=True)
        monkeypatch.setattr("sys.argv", ["t", *argv])
        args, cfg = _common.parse(p)
        assert (args.run, args.mels) == ("runs/x/train", "m")
        assert args.overrides == ["eval.max_questions=8", "eval.split=dev"]
        assert (cfg.eval.max_questions, cfg.eval.split, cfg.features.n_mels) == (8, "dev", 80)


def test_the_eval_section_and_job_flags_are_the_same_keys():
    """A job flag that names a config key (jobs/_common.py aliases) sets that key, typed, after the overrides."""
    import sys

    from jobs import _common

    p = _common.parser("t", aliases={"--device": "eval.device", "--max-new-tokens": "eval.max_new_tokens",
                                     "--skip-bad-rows": "eval.skip_bad_rows", "--model": "teacher.model"})
    argv = sys.argv
    try:
        sys.argv = ["t", "--config", "tiny", "eval.device=cuda", "eval.max_new_tokens=3", "--max-new-tokens", "9",
                    "--skip-bad-rows", "--model", "gs://b/llm"]
        _, cfg = _common.parse(p)
    finally:
        sys.argv = argv
    assert (cfg.eval.device, cfg.eval.max_new_tokens, cfg.eval.skip_bad_rows) == ("cuda", 9, True)
    assert cfg.teacher.model == "gs://b/llm"
    assert load_config("tiny", ["eval.split=test", "train.w_kl=0.5", "teacher.top_k=5"]).eval.split == "test"
    with pytest.raises(SystemExit):  # argparse refuses a choice outside the key's Literal
        p.parse_args(["--device", "tpu"])
