"""Beyond the paper: distilling the teacher's states along its own response (teacher.response_tokens K,
train.distill_positions P). The multi-position loss against a hand computation, the student's teacher-forced
positions against a direct LLM forward, P = 1 against the paper's step bit for bit, collate's masks and
padding, and the stages end to end on a real local Ray (the cache's states against compute_targets)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import FEW_QUERIES

from pipeline import cache
from pipeline.backends import PlainBackend
from pipeline.config import ConfigError, load_config
from pipeline.ingest import collate
from pipeline.losses import DivaLoss, distillation_loss, multi_position_distillation, position_weights
from pipeline.model import build_student
from pipeline.step import forward_loss, make_optimizer, train_step
from pipeline.teacher import encode_targets

B, Q, H = 3, 16, 64  # the tiny LLM's hidden size


def cfg(*overrides: str):
    return load_config("tiny", [f"model.num_queries={Q}", *overrides])


# --- the loss ----------------------------------------------------------------------------------------------------


def test_the_multi_position_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # the second response ended after one token
    d = 0.5
    got = multi_position_distillation(hs, ht, mask, decay=d)
    n = [[float(np.linalg.norm((hs[b, j] - ht[b, j]).numpy())) for j in range(3)] for b in range(2)]
    hand = [(n[0][0] + d * n[0][1] + d * d * n[0][2]) / (1 + d + d * d), n[1][0]]
    np.testing.assert_allclose(got.numpy(), hand, rtol=1e-6)
    # Uniform weights: each example's mean over its own positions.
    np.testing.assert_allclose(multi_position_distillation(hs, ht, mask).numpy(), [np.mean(n[0]), n[1][0]], rtol=1e-6)
    np.testing.assert_allclose(position_weights(mask, d).sum(1).numpy(), [1.0, 1.0], rtol=1e-6)


def test_masked_positions_take_no_part():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    ht = torch.randn(2, 4, 8, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    other = ht.clone()
    other[0, 2:] = float("nan")  # whatever sits at a masked position
    loss = multi_position_distillation(hs, ht, mask).sum()
    assert torch.equal(multi_position_distillation(hs, other, mask).sum(), loss)
    loss.backward()
    assert torch.all(hs.grad[0, 2:] == 0) and torch.all(hs.grad[0, :2] != 0)


def test_one_position_is_the_paper_s_distillation_loss():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(5, H, generator=g), torch.randn(5, H, generator=g)
    one = multi_position_distillation(hs[:, None], ht[:, None], torch.ones(5, 1), decay=0.3)
    assert torch.equal(one, distillation_loss(hs, ht))


# --- the student's positions -------------------------------------------------------------------------------------


def test_the_student_reads_the_response_after_its_virtual_tokens():
    model = build_student(cfg(), seed=0).eval()
    g = torch.Generator().manual_seed(3)
    virtual = torch.randn(B, Q, H, generator=g)
    response = torch.randint(0, 500, (B, 3), generator=g)
    with torch.no_grad():
        got = model.student_hidden(virtual, response)
        first = model.student_hidden(virtual)
        embeds = torch.cat([model.student_inputs(virtual), model.llm.get_input_embeddings()(response)], dim=1)
        direct = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    assert got.shape == (B, 4, H)
    torch.testing.assert_close(got, direct[:, -4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, 0], first, rtol=0, atol=1e-5)  # causal: the response changes nothing before it


def batch(step: int, positions: int | None = None) -> dict[str, torch.Tensor]:
    """A collate-shaped batch; with `positions`, in the multi-position layout (row 1's response is 2 long)."""
    g = torch.Generator().manual_seed(step % 2)
    out = {"input_features": torch.randn(B, 128, 3000, generator=g),
           "token_ids": torch.randint(0, 600, (B, Q), generator=g), "lengths": torch.tensor([3, 9, 5]),
           "target": torch.randn(B, H, generator=g)}
    if positions is None:
        return out
    target = torch.randn(B, positions, H, generator=g)
    target[:, 0] = out["target"]
    mask = torch.ones(B, positions)
    mask[1, 2:] = 0.0
    target[1, 2:] = 0.0
    return out | {"target": target, "target_mask": mask,
                  "response_ids": torch.randint(0, 500, (B, positions - 1), generator=g)}


def trajectory(run_cfg, batches, loss_fn, steps: int = 3):
    model = build_student(run_cfg, seed=0)
    opt, backend = make_optimizer(model.trainable_parameters(), run_cfg.train), PlainBackend(run_cfg.train)
    out = [train_step(model, [batches(s)], loss_fn, opt, backend, lr=1e-3, grad_clip=1.0).parts for s in range(steps)]
    return [(float(p.total), float(p.distill), float(p.align)) for p in out], model.trainable_parameters()


def test_one_position_through_the_multi_position_path_is_the_paper_s_step_exactly():
    """P = 1 in the general layout (target [B, 1, H], a mask of ones, no response ids) trains bit for bit
    like the paper's layout: the same losses and the same weights after three steps."""
    paper, paper_weights = trajectory(cfg(), batch, DivaLoss())

    def general(step: int) -> dict[str, torch.Tensor]:
        b = batch(step)
        return b | {"target": b["target"][:, None], "target_mask": torch.ones(B, 1),
                    "response_ids": torch.zeros(B, 0, dtype=torch.long)}

    ours, weights = trajectory(cfg(), general, DivaLoss(position_decay=0.5))
    assert ours == paper
    for name, w in paper_weights.items():
        assert torch.equal(weights[name], w), name


def test_more_positions_train_and_their_first_is_the_paper_s_target():
    parts = forward_loss(build_student(cfg(), seed=0), batch(0, positions=4), DivaLoss())
    first = forward_loss(build_student(cfg(), seed=0), batch(0), DivaLoss())
    assert parts.align == first.align and parts.distill != first.distill and parts.distill > 0
    losses, _ = trajectory(cfg(), lambda s: batch(s, positions=4), DivaLoss(), steps=4)
    assert losses[-1][0] < losses[0][0]  # the same two batches again and again: it learns them


# --- collate -----------------------------------------------------------------------------------------------------


def rows(responses: list[list[int]], dtype: str = "float16") -> tuple[dict, list[np.ndarray]]:
    g = np.random.default_rng(0)
    states = [g.standard_normal((len(r), H)).astype(np.float32) for r in responses]
    mel = np.zeros((128, 10), np.float16).tobytes()
    batch = {"id": np.array([f"c{i}" for i in range(len(responses))]), "mel": [mel] * len(responses),
             "mel_pad_value": np.zeros(len(responses)), "token_ids": [[5, 6]] * len(responses),
             "target": [encode_targets(s[:1], dtype)[0] for s in states],
             "response_ids": responses, "response_target": [b"".join(encode_targets(s, dtype)) for s in states]}
    return batch, states


def test_collate_pads_the_response_to_static_shapes():
    batch, states = rows([[7, 8, 9, 2], [4], [3, 2]])
    out = collate(batch, n_mels=128, n_frames=100, num_queries=Q, target_dtype="float16", distill_positions=3)
    assert out["target"].shape == (3, 3, H) and out["target_mask"].shape == (3, 3)
    assert out["response_ids"].tolist() == [[7, 8], [4, 0], [3, 2]]
    assert out["target_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    for i, s in enumerate(states):
        n = min(len(s), 3)
        np.testing.assert_allclose(out["target"][i, :n].numpy(), s[:n], rtol=1e-3, atol=1e-3)
        assert torch.all(out["target"][i, n:] == 0)
    plain = collate(batch, n_mels=128, n_frames=100, num_queries=Q, target_dtype="float16")
    assert plain["target"].shape == (3, H) and "response_ids" not in plain
    torch.testing.assert_close(plain["target"], out["target"][:, 0], rtol=0, atol=0)


def test_collate_names_a_row_whose_states_do_not_fit_its_response():
    batch, _ = rows([[7, 8], [4]])
    batch["response_target"][1] = batch["response_target"][1][:-2]
    with pytest.raises(ValueError, match=r"row 1 \(c1\): response_target"):
        collate(batch, n_mels=128, n_frames=100, num_queries=Q, target_dtype="float16", distill_positions=2)
    del batch["response_ids"]
    with pytest.raises(ValueError, match="teacher.response_tokens"):
        collate(batch, n_mels=128, n_frames=100, num_queries=Q, target_dtype="float16", distill_positions=2)


def test_the_config_asks_for_a_cache_with_enough_positions():
    with pytest.raises(ConfigError, match="teacher.response_tokens >= 4"):
        cfg("train.distill_positions=4", "teacher.response_tokens=2")
    with pytest.raises(ConfigError, match="distill_positions must be >= 1"):
        cfg("train.distill_positions=0")
    with pytest.raises(ConfigError, match="position_decay"):
        cfg("train.position_decay=0")
    assert cfg("train.distill_positions=4", "teacher.response_tokens=4").train.distill_positions == 4


# --- the stages on a real local Ray -------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_and_training_with_response_positions(ray_local, sixteen_mels, tmp_path):
    """The teacher caches K states per row equal to compute_targets' (float16 storage), a run asking for
    more positions than the cache holds is refused by name, and a P = 3 run trains and logs."""
    from pipeline.builders import load_tokenizer, tiny_llama
    from pipeline.teacher import compute_targets, decode_target, run_teacher, target_spec
    from pipeline.template import derive_template, stop_ids
    from pipeline.train import run_training

    k = 4
    run = cfg("prepare.splits=[train]", "prepare.limit=16", f"teacher.response_tokens={k}",
              "train.distill_positions=3", "train.global_batch_size=8", "train.micro_batch_size=8",
              "train.steps=2", "train.log_every=1", "train.checkpoint_every=2", FEW_QUERIES)
    mels, teacher = sixteen_mels, tmp_path / "teacher"  # `run`'s stage 1: the 16 train clips
    manifest = run_teacher(run, str(mels), str(teacher))
    assert manifest["response_tokens"] == k
    got = [r for f in sorted((teacher / "targets").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(got) == 16

    tok = load_tokenizer(run.teacher)
    template = derive_template(tok)
    llm = tiny_llama(len(tok), seed=run.teacher.tiny_seed)
    ref = compute_targets(llm, template, [r["token_ids"] for r in got], response_tokens=k,
                          stops=sorted(stop_ids(llm, tok, template)))
    for i, r in enumerate(got):
        assert r["response_ids"] == ref.responses[i]
        states = np.stack([decode_target(b, "float16") for b in _rows_of(r["response_target"], H)])
        np.testing.assert_allclose(states, ref.response_hidden[i], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(states[0], decode_target(r["target"], "float16"))

    more = cfg("prepare.splits=[train]", "prepare.limit=16", "teacher.response_tokens=8", "train.distill_positions=8")
    with pytest.raises(cache.DatasetError, match=r"holds the teacher's states at 4 .*teacher.response_tokens >= 8"):
        from pipeline.ingest import training_dataset

        expect = target_spec(more.teacher, tok, template)
        training_dataset(str(mels), str(teacher), expect=expect, split="train", positions=8)

    run_training(run, str(mels), str(teacher), str(tmp_path / "run"))
    logged = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 2 and all('"distill"' in line for line in logged)


def _rows_of(blob: bytes, hidden: int) -> list[bytes]:
    width = 2 * hidden
    return [blob[i : i + width] for i in range(0, len(blob), width)]
