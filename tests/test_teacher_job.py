"""Stage 2 on a real local Ray: targets equal a direct forward, resume, idempotence, fingerprints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from pipeline import cache
from pipeline.builders import load_tokenizer, tiny_llama
from pipeline.config import load_config
from pipeline.layout import REJECTS_DIR, TARGETS_DIR
from pipeline.teacher import (
    TOO_LONG,
    decode_target,
    open_teacher,
    run_teacher,
    target_spec,
)
from pipeline.template import derive_template, render_ids

pytestmark = pytest.mark.slow
TOKENIZER = Path(__file__).parent / "fixtures" / "tokenizer"


def tiny(*overrides: str):
    return load_config("tiny", list(overrides))


def read(out: Path, sub: str) -> list[dict]:
    return [r for f in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def sentences(mels: Path) -> dict[str, str]:
    return {r["id"]: r["sentence"] for r in read(mels, "mels")}


def direct_target(model, ids: list[int]) -> np.ndarray:
    """h at the last position after the final norm, from one unpadded sequence (no bucketing)."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float().numpy()


@pytest.mark.parametrize("padding_side, top_k", [("right", 0), ("left", 5)])
def test_cached_targets_equal_a_direct_forward(prepared_mels, tmp_path, padding_side, top_k):
    cfg = tiny(f"teacher.padding_side={padding_side}", f"teacher.top_k={top_k}", "teacher.rows_per_file=16")
    out = tmp_path / "teacher"
    manifest = run_teacher(cfg, str(prepared_mels), str(out))
    rows = read(out, TARGETS_DIR)
    text = sentences(prepared_mels)
    assert sorted(r["id"] for r in rows) == sorted(text) and manifest["counts"]["targets"] == len(text)

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    template = derive_template(tok)
    model = tiny_llama(len(tok), seed=cfg.teacher.tiny_seed)
    prefix, suffix = manifest["target"]["template"]["prefix_ids"], manifest["target"]["template"]["suffix_ids"]
    worst = 0.0
    for row in rows:
        # Token ids are the transcript alone and decode back to it; the template matches the chat template.
        assert tok.decode(row["token_ids"]) == text[row["id"]]
        full = render_ids(tok, text[row["id"]])
        assert full == prefix + row["token_ids"] + suffix
        expected = direct_target(model, template.wrap(row["token_ids"]))
        got = decode_target(row["target"], "float16")
        assert got.shape == (manifest["target"]["hidden_size"],)
        # float16 storage: relative rounding 2^-11, so 1e-3 relative plus a small absolute floor.
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
        worst = max(worst, float(np.abs(got - expected).max()))
        if top_k:
            logits = model(input_ids=torch.tensor([full])).logits[0, -1]
            ref = torch.topk(torch.log_softmax(logits.float(), -1), top_k)
            assert row["topk_ids"] == ref.indices.tolist()
            np.testing.assert_allclose(row["topk_logprobs"], ref.values.detach().numpy(), atol=1e-4)
    assert worst < 5e-3


def test_resume_and_idempotence(prepared_mels, tmp_path):
    cfg = tiny("teacher.rows_per_file=6", "teacher.rows_per_call=6")
    clean, out = tmp_path / "clean", tmp_path / "resumed"
    run_teacher(cfg, str(prepared_mels), str(clean))
    shutil.copytree(clean, out)
    # As if the run had died: manifest not yet written, some files never written, one cut mid-write.
    (out / cache.MANIFEST).unlink()
    files = sorted((out / TARGETS_DIR).glob("part-*.parquet"))
    assert len(files) >= 4
    for f in files[:2]:
        f.unlink()
    files[2].write_bytes(files[2].read_bytes()[:300])
    manifest = run_teacher(cfg, str(prepared_mels), str(out))
    by_id = {r["id"]: r for r in read(out, TARGETS_DIR)}
    expected = {r["id"]: r for r in read(clean, TARGETS_DIR)}
    assert len(by_id) == len(read(out, TARGETS_DIR)), "duplicates"
    assert by_id.keys() == expected.keys()
    assert all(by_id[i]["target"] == expected[i]["target"] for i in expected)
    # A run on the complete output does nothing.
    names = sorted(p.name for p in (out / TARGETS_DIR).iterdir())
    assert run_teacher(cfg, str(prepared_mels), str(out)) == manifest
    assert sorted(p.name for p in (out / TARGETS_DIR).iterdir()) == names


def test_over_long_transcripts_are_rejected_by_name(prepared_mels, tmp_path):
    out = tmp_path / "teacher"
    manifest = run_teacher(tiny("teacher.max_transcript_tokens=30"), str(prepared_mels), str(out))
    rejects, rows = read(out, REJECTS_DIR), read(out, TARGETS_DIR)
    assert rejects and all(r["reason"] == TOO_LONG and "> max_transcript_tokens 30" in r["detail"] for r in rejects)
    assert all(len(r["token_ids"]) <= 30 for r in rows)
    assert sorted([r["id"] for r in rows] + [r["id"] for r in rejects]) == sorted(sentences(prepared_mels))
    assert manifest["counts"]["rejects_by_reason"] == {TOO_LONG: len(rejects)}


def test_cache_for_another_model_or_template_is_refused(prepared_mels, teacher_cache, tmp_path):
    cfg = tiny()
    out = tmp_path / "teacher"
    shutil.copytree(teacher_cache, out)  # conftest's run_teacher(tiny preset): what this test ran itself before
    tok = load_tokenizer(cfg.teacher)
    same = target_spec(cfg.teacher, tok, derive_template(tok))
    assert open_teacher(str(out), same)["counts"]["targets"] > 0

    other_seed = tiny("teacher.tiny_seed=1").teacher
    with pytest.raises(cache.DatasetError, match="another model/template.*revision: 'tiny-"):
        open_teacher(str(out), target_spec(other_seed, tok, derive_template(tok)))
    with_system = tiny("teacher.system_prompt=Be brief.").teacher
    with pytest.raises(cache.DatasetError, match="template.system_prompt: None -> 'Be brief.'"):
        open_teacher(str(out), target_spec(with_system, tok, derive_template(tok, "Be brief.")))
    # Writing into the same output with another model is refused too, naming the difference.
    with pytest.raises(cache.DatasetError, match="another plan.*tiny_seed|another plan.*revision"):
        run_teacher(tiny("teacher.tiny_seed=1"), str(prepared_mels), str(out))
    with pytest.raises(cache.DatasetError, match="not a finished dataset|no manifest"):
        open_teacher(str(tmp_path / "nothing"))
