"""Export: a training checkpoint -> a model directory in the released DiVA layout, and back to a model
that generates exactly what the trained one does."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.ask import generate, llm_inputs, load_audio
from pipeline.builders import tiny_whisper
from pipeline.config import load_config
from pipeline.export import (
    ExportError,
    ModelDirError,
    export_checkpoint,
    load_model,
    read_config,
    resolve_checkpoint,
)
from pipeline.model import build_student
from pipeline.template import derive_template, stop_ids

CLIP = Path(__file__).parent / "fixtures" / "commonvoice" / "clips" / "common_voice_en_18327603.mp3"


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """Move every trainable weight off its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def trained(cfg):
    model = build_student(cfg)
    perturb(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(trained, cfg, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "ck", trained, cfg, step=5)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return Path(export_checkpoint(str(checkpoint), str(tmp_path_factory.mktemp("export") / "model")))


@pytest.fixture(scope="module")
def loaded(exported):
    return load_model(str(exported))


@pytest.fixture(scope="module")
def features():
    return load_audio(CLIP)


def test_weights_follow_the_reference_layout(exported, trained, features):
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    weights = load_file(str(exported / "model.safetensors"))
    decoder = tiny_whisper(seed=0).model.decoder
    assert names == {"query_tokens", "projection.weight", "projection.bias"} | {
        f"connector.{k}" for k in decoder.state_dict()}
    assert weights["query_tokens"].shape == (448, 64)
    assert torch.equal(weights["query_tokens"], trained.queries)
    # The reference stores the projection in x out and loads it with `.T`.
    assert torch.equal(weights["projection.weight"], trained.projection.weight.t())
    assert torch.equal(weights["projection.bias"], trained.projection.bias)
    # The reference's loader: a copy of the Whisper decoder, strict load of connector.*, then
    # decoder(inputs_embeds=query_tokens, encoder_hidden_states=A) @ W + b. It must give our virtual tokens.
    connector = copy.deepcopy(decoder)
    connector.load_state_dict({k[len("connector."):]: v for k, v in weights.items() if k.startswith("connector.")},
                              strict=True)
    assert torch.equal(connector.embed_tokens.weight, decoder.embed_tokens.weight)  # the base table, unused
    with torch.no_grad():
        audio = trained.encoder(features).last_hidden_state
        hidden = connector(inputs_embeds=weights["query_tokens"][None], encoder_hidden_states=audio)[0]
        reference = hidden @ weights["projection.weight"] + weights["projection.bias"]
        ours = trained.virtual_tokens(features)
    torch.testing.assert_close(reference, ours, rtol=0, atol=1e-5)


def test_config_names_the_base_models_and_the_template(exported, cfg):
    config = read_config(str(exported))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher.tokenizer)
    template = derive_template(tokenizer)
    assert config["whisper"]["tiny"]["seed"] == cfg.model.tiny_whisper_seed
    assert config["llm"]["tiny"] == {"seed": cfg.teacher.tiny_seed, "vocab_size": len(tokenizer),
                                     "config": config["llm"]["tiny"]["config"]}
    assert (config["num_queries"], config["d"], config["H"]) == (448, 64, 64)
    assert config["template"]["prefix_ids"] == list(template.prefix_ids)
    assert config["template"]["suffix_ids"] == list(template.suffix_ids)
    assert config["template"]["system_prompt"] is None and config["template"]["instruction"] == "system"
    assert config["source"]["step"] == 5
    assert config["features"]["n_mels"] == 128 and config["audio_checks"]["max_duration_s"] == 30.0
    for name in ("tokenizer_config.json", "tokenizer.json"):
        assert (exported / name).is_file()


def test_loaded_model_equals_the_trained_one(loaded, trained):
    model, _ = loaded
    theirs = trained.state_dict()
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]
    assert model.template == trained.template and not model.training


def test_export_load_generate_gives_the_same_tokens(loaded, trained, features):
    model, tokenizer = loaded
    greedy = list(generate(model, tokenizer, features, max_new_tokens=16))
    assert greedy == list(generate(trained, tokenizer, features, max_new_tokens=16))
    assert len(greedy) >= 2
    sampled = list(generate(model, tokenizer, features, max_new_tokens=16, temperature=1.0, seed=3))
    assert sampled == list(generate(trained, tokenizer, features, max_new_tokens=16, temperature=1.0, seed=3))


def test_kv_cache_generation_equals_full_recomputation(loaded, features):
    """Independent of the cache and of ask's input assembly: the training forward (DiVA.forward) gives
    the first token, then every step reruns the whole sequence without a cache."""
    model, tokenizer = loaded
    tokens = list(generate(model, tokenizer, features, max_new_tokens=10))
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        virtual, h, _ = model(features)
        assert int(model.llm.get_output_embeddings()(h).argmax()) == tokens[0]
        prompt = model.student_inputs(virtual)
        torch.testing.assert_close(prompt, llm_inputs(model, model.template, features), rtol=0, atol=0)
        for i, token in enumerate(tokens):
            seq = torch.cat([prompt, embed(torch.tensor([tokens[:i]], dtype=torch.long))], dim=1)
            logits = model.llm(inputs_embeds=seq, use_cache=False).logits[0, -1]
            top2 = logits.topk(2).values
            assert int(logits.argmax()) == token, f"step {i}"
            assert float(top2[0] - top2[1]) > 1e-4, "near tie: the comparison would be meaningless"


def test_seeded_sampling_equals_full_recomputation(loaded, features):
    """Sampling through transformers' generate (KV cache) draws what a hand-written loop draws: full
    recomputation at every step, softmax(logits / T) and one multinomial per token from a generator seeded
    with the same seed."""
    model, tokenizer = loaded
    temperature, seed, n = 1.5, 7, 12
    tokens = list(generate(model, tokenizer, features, max_new_tokens=n, temperature=temperature, seed=seed))
    stops = stop_ids(model.llm, tokenizer, model.template)
    embed = model.llm.get_input_embeddings()
    rng = torch.Generator().manual_seed(seed)
    expected: list[int] = []
    with torch.no_grad():
        prompt = llm_inputs(model, model.template, features)
        while len(expected) < n and not (expected and expected[-1] in stops):
            seq = torch.cat([prompt, embed(torch.tensor([expected], dtype=torch.long))], dim=1)
            logits = model.llm(inputs_embeds=seq, use_cache=False).logits[0, -1].float()
            expected.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng)))
    assert tokens == expected
    assert len(set(tokens)) > 1  # a sampled answer, not a constant one


def test_export_is_idempotent_and_keeps_another_export(checkpoint, exported, trained, cfg, tmp_path):
    before = (exported / "config.json").read_text()
    assert export_checkpoint(str(checkpoint), str(exported)) == str(exported)
    assert (exported / "config.json").read_text() == before  # nothing rewritten

    out = tmp_path / "model"
    shutil.copytree(exported, out)
    other = copy.deepcopy(trained)
    perturb(other, seed=2)
    other_ck = write_checkpoint(tmp_path / "other", other, cfg, step=9)
    with pytest.raises(ExportError, match="another export"):
        export_checkpoint(str(other_ck), str(out))
    export_checkpoint(str(other_ck), str(out), overwrite=True)
    assert torch.equal(load_file(str(out / "model.safetensors"))["query_tokens"], other.queries)
    assert read_config(str(out))["source"]["step"] == 9
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def two_checkpoint_run(checkpoint: Path, run: Path) -> tuple[Path, Path]:
    """A run directory holding `checkpoint` twice, as steps 2 and 4 (the older first)."""
    made = []
    for name, step in (("checkpoint_2025-01-01_10-00-00.000001", 2), ("checkpoint_2025-01-01_11-00-00.000001", 4)):
        shutil.copytree(checkpoint, run / "train" / name)
        meta = json.loads((run / "train" / name / "checkpoint.json").read_text())
        meta["state"]["step"] = step
        (run / "train" / name / "checkpoint.json").write_text(json.dumps(meta))
        made.append(run / "train" / name)
    return made[0], made[1]


def test_a_run_directory_exports_its_latest_complete_checkpoint(checkpoint, tmp_path):
    run = tmp_path / "run"
    two_checkpoint_run(checkpoint, run)
    incomplete = run / "train" / "checkpoint_2025-01-01_12-00-00.000001"  # an upload cut short
    incomplete.mkdir()
    shutil.copy(checkpoint / "trainable.safetensors", incomplete)
    latest = str(run / "train" / "checkpoint_2025-01-01_11-00-00.000001")
    assert resolve_checkpoint(str(run)) == latest
    assert resolve_checkpoint(str(run / "train")) == latest
    assert resolve_checkpoint(str(checkpoint)) == str(checkpoint)
    out = export_checkpoint(str(run), str(tmp_path / "model"))
    assert read_config(out)["source"] == read_config(out)["source"] | {"checkpoint": latest, "step": 4}
    with pytest.raises(ExportError, match="no checkpoint here"):
        resolve_checkpoint(str(tmp_path / "nothing"))


def test_a_checkpoint_that_fails_its_checksum_is_skipped_for_the_one_before_it(checkpoint, tmp_path, caplog):
    """Issue 12: export and resume take the newest checkpoint that passes its checksums, saying so; a checkpoint
    named directly is never swapped for another (its corrupt file stops the export, tests/test_corrupt.py)."""
    from pipeline.checkpoint import CheckpointError, newest_intact
    from pipeline.train import finished_step, resumable

    older, newer = two_checkpoint_run(checkpoint, tmp_path / "run")
    assert resumable(str(newer)).state.step == 4  # both intact: the restored one itself
    optimizer = newer / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit: same size, other content
    optimizer.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        assert resumable(str(newer)).url == str(older)  # resume reads the optimizer: the older one
    assert f"skipping checkpoint {newer} (step 4): {newer}/optimizer.safetensors: checksum mismatch" in caplog.text
    assert f"taking checkpoint {older} (step 2)" in caplog.text
    assert read_config(export_checkpoint(str(tmp_path / "run"), str(tmp_path / "a")))["source"]["step"] == 4
    weights = newer / "trainable.safetensors"  # export reads the weights only: a cut weights file counts
    weights.write_bytes(weights.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        source = read_config(export_checkpoint(str(tmp_path / "run"), str(tmp_path / "b")))["source"]
    assert source["checkpoint"] == str(older) and source["step"] == 2
    assert "trainable.safetensors: checksum mismatch" in caplog.text
    assert finished_step(load_config("tiny", ["train.steps=4"]).train, str(tmp_path / "run")) is None  # not done
    with pytest.raises(ExportError, match="checksum mismatch"):
        export_checkpoint(str(newer), str(tmp_path / "c"))
    (older / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint passes its checksums: .*11-00.*; .*10-00"):
        newest_intact([(2, str(older)), (4, str(newer))])


def test_a_checkpoint_whose_checkpoint_json_is_cut_is_skipped_for_the_one_before_it(checkpoint, tmp_path, caplog):
    """An upload cut inside checkpoint.json (a SIGKILL, a full disk): resume, export of the run and jobs.local's
    "already trained?" all take the checkpoint before it, saying so; named directly, it stops with one line."""
    from pipeline.train import finished_step, resumable

    older, newer = two_checkpoint_run(checkpoint, tmp_path / "run")
    meta = newer / "checkpoint.json"
    meta.write_bytes(meta.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="pipeline.export"):
        assert resumable(str(newer)).url == str(older)
    assert f"skipping checkpoint {newer}: its checkpoint.json is not valid JSON" in caplog.text
    assert read_config(export_checkpoint(str(tmp_path / "run"), str(tmp_path / "a")))["source"]["step"] == 2
    assert finished_step(load_config("tiny", ["train.steps=4"]).train, str(tmp_path / "run")) is None
    with pytest.raises(ExportError, match="checkpoint.json: not valid JSON"):
        export_checkpoint(str(newer), str(tmp_path / "b"))


def test_untrained_parts_are_exported_at_their_initialisation(tmp_path):
    """With model.trainable without `queries`, the checkpoint has no query vectors: the export holds
    the run's initial ones (seed = train.seed), so inference uses what training used."""
    cfg = load_config("tiny", ["model.trainable=[qformer, projection]", "train.seed=7"])
    model = build_student(cfg, seed=7)
    perturb(model, seed=4)
    ck = write_checkpoint(tmp_path / "ck", model, cfg, step=1)
    assert "queries" not in load_file(str(ck / "trainable.safetensors"))
    out = export_checkpoint(str(ck), str(tmp_path / "model"))
    weights = load_file(str(Path(out) / "model.safetensors"))
    assert torch.equal(weights["query_tokens"], model.queries)
    assert torch.equal(weights["projection.bias"], model.projection.bias)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_an_incomplete_model_directory_names_the_missing_file(exported, tmp_path, missing):
    broken = tmp_path / "model"
    shutil.copytree(exported, broken)
    (broken / missing).unlink()
    with pytest.raises(ModelDirError, match=f"incomplete model directory: {missing} is missing"):
        load_model(str(broken))


def test_bad_model_directories_and_checkpoints(exported, checkpoint, tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        load_model(str(tmp_path / "absent"))
    broken = tmp_path / "model"
    shutil.copytree(exported, broken)
    weights = load_file(str(broken / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if k != "connector.layers.1.fc2.weight"},
              str(broken / "model.safetensors"))
    with pytest.raises(ModelDirError, match="connector.* weights do not fit"):
        load_model(str(broken))
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / "trainable.safetensors").unlink()
    with pytest.raises(ExportError, match="incomplete checkpoint: trainable.safetensors is missing"):
        export_checkpoint(str(ck), str(tmp_path / "out"))
    (ck / "checkpoint.json").unlink()
    with pytest.raises(ExportError, match="no checkpoint here: expected checkpoint.json"):
        export_checkpoint(str(ck), str(tmp_path / "out"))


@pytest.mark.slow
def test_export_and_load_on_gcs(gcs, bucket, checkpoint, trained, features):
    fs = gcs.fs()
    fs.put(str(checkpoint), f"{bucket}/run/train/checkpoint_2025-01-01_10-00-00.000001", recursive=True)
    fs.invalidate_cache()
    out = export_checkpoint(f"gs://{bucket}/run", f"gs://{bucket}/models/diva")
    assert out == f"gs://{bucket}/models/diva"
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/models/diva")} >= {"config.json", "model.safetensors",
                                                                                 "tokenizer_config.json"}
    model, tokenizer = load_model(out)
    assert torch.equal(model.queries, trained.queries)
    assert list(generate(model, tokenizer, features, max_new_tokens=4)) == list(
        generate(trained, tokenizer, features, max_new_tokens=4))
