"""The DiVA student: Whisper-decoder initialisation, what trains and what stays frozen, and that every
piece equals the plain transformers computation it stands for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.builders import student_whisper, tiny_llama, tiny_whisper
from pipeline.config import ModelConfig, load_config
from pipeline.model import DiVA, build_student
from pipeline.teacher import compute_targets
from pipeline.template import derive_template, transcript_ids

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tokenizer"
ATOL = 1e-5  # float32 on CPU: only reduction order differs between equivalent computations


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def template(tokenizer):
    return derive_template(tokenizer)


@pytest.fixture(scope="module")
def llm(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper(seed=0)


@pytest.fixture
def make(whisper, llm, template):
    """A fresh student around the shared (frozen) whisper and LLM, with ModelConfig overrides."""

    def build(seed: int = 0, **overrides) -> DiVA:
        return DiVA(whisper, llm, template, ModelConfig(whisper="tiny", **overrides), seed=seed)

    return build


def features(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, 3000, generator=torch.Generator().manual_seed(seed))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"


def test_tiny_whisper_is_seeded_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = tiny_whisper(seed=0), tiny_whisper(seed=0), tiny_whisper(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.decoder.layers.0.fc1.weight"], sc["model.decoder.layers.0.fc1.weight"])
    with torch.no_grad():
        encoded = a.model.encoder(features(1)).last_hidden_state
    assert encoded.shape == (1, 1500, 64)


def test_qformer_is_a_bit_exact_copy_of_the_whisper_decoder(make, whisper):
    model = make()
    decoder = whisper.model.decoder.state_dict()
    copied = model.qformer.state_dict()
    # Everything but the token-embedding table, which the queries replace.
    assert set(copied) == set(decoder) - {"embed_tokens.weight"}
    assert model.qformer.embed_tokens is None
    for name, tensor in copied.items():
        assert torch.equal(tensor, decoder[name]), name
        assert tensor.data_ptr() != decoder[name].data_ptr(), f"{name} is shared, not copied"


def test_build_student_starts_from_the_pretrained_whisper_and_the_teachers_llm(tokenizer, template):
    cfg = load_config("tiny")
    model = build_student(cfg, tokenizer)
    pretrained = student_whisper(cfg.model)
    decoder = pretrained.model.decoder.state_dict()
    assert all(torch.equal(t, decoder[k]) for k, t in model.qformer.state_dict().items())
    encoder = pretrained.model.encoder.state_dict()
    assert all(torch.equal(t, encoder[k]) for k, t in model.encoder.state_dict().items())
    # The frozen LLM is exactly the model behind the teacher cache, with the same template.
    teacher = tiny_llama(len(tokenizer), seed=cfg.teacher.tiny_seed).state_dict()
    assert model.llm.state_dict().keys() == teacher.keys()
    assert all(torch.equal(t, teacher[k]) for k, t in model.llm.state_dict().items())
    assert model.template == template
    assert model.seq_len == len(template.prefix_ids) + 448 + len(template.suffix_ids) == 458


def test_queries_are_small_seeded_normals(make):
    state = torch.random.get_rng_state()
    model, same, other = make(), make(), make(seed=1)
    mean_init = [make(projection_init="mean_embedding") for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(mean_init[0].projection.weight, mean_init[1].projection.weight)
    q = model.queries.detach()
    assert q.shape == (448, 64)
    assert abs(q.std().item() - 0.02) < 0.001 and abs(q.mean().item()) < 0.001
    assert torch.equal(q, same.queries) and not torch.equal(q, other.queries)
    assert torch.equal(model.projection.weight, same.projection.weight)
    assert make(query_init_std=0.5).queries.std().item() == pytest.approx(0.5, rel=0.05)


def test_by_default_exactly_queries_qformer_and_projection_train(make):
    model = make()
    names = set(model.trainable_parameters())
    expected = {"queries"} | {f"qformer.{n}" for n, _ in model.qformer.named_parameters()} | {
        "projection.weight", "projection.bias"}
    assert names == expected
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(n.startswith("qformer.embed_tokens") for n in names)


@pytest.mark.parametrize("parts", [["projection"], ["queries", "projection"], ["qformer"]])
def test_the_trainable_option_selects_parts(make, parts):
    names = set(make(trainable=parts).trainable_parameters())
    assert {n.split(".")[0] for n in names} == set(parts)


def test_bad_model_options_are_refused(make):
    # Choices (model.trainable, model.projection_init) are refused when the config loads: test_config.
    with pytest.raises(ValueError, match="448 positions"):
        make(num_queries=449)


def test_an_optimizer_step_moves_only_the_trainable_weights(make, whisper):
    model = make()
    encoder, llm, decoder = snapshot(model.encoder), snapshot(model.llm), snapshot(whisper.model.decoder)
    trainable = {k: p.detach().clone() for k, p in model.trainable_parameters().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-3, weight_decay=0.1)
    h = model(features(2)).h_student
    h.mean().backward()
    optimizer.step()
    assert_bit_identical(model.encoder, encoder)
    assert_bit_identical(model.llm, llm)
    assert_bit_identical(whisper.model.decoder, decoder)  # the Q-Former trains its own copy
    unchanged = [k for k, p in model.trainable_parameters().items() if torch.equal(p, trainable[k])]
    assert not unchanged


def test_gradients_reach_queries_and_qformer_but_not_frozen_parts(make):
    model = make()
    h = model(features(2)).h_student
    h.mean().backward()
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0
    for name, p in model.qformer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.llm.parameters())


def test_gradients_reach_the_queries_through_a_frozen_qformer(make):
    model = make(trainable=["queries"])
    h = model(features(1)).h_student
    h.mean().backward()
    assert model.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.qformer.parameters())


def test_virtual_tokens_equal_whisper_then_projection(make, whisper):
    model = make()
    x = features(2)
    with torch.no_grad():
        # An independent path: transformers' own WhisperModel, decoder fed the queries as inputs_embeds.
        out = whisper.model(input_features=x, decoder_inputs_embeds=model.queries.expand(2, -1, -1), use_cache=False)
        expected = model.projection(out.last_hidden_state)
        got = model.virtual_tokens(x)
    assert got.shape == (2, 448, model.hidden_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_student_inputs_are_prefix_virtual_suffix(make, template):
    model = make()
    virtual = torch.randn(3, 448, model.hidden_size)
    inputs = model.student_inputs(virtual)
    p, s = len(template.prefix_ids), len(template.suffix_ids)
    assert inputs.shape == (3, p + 448 + s, model.hidden_size) and inputs.shape[1] == model.seq_len
    prefix = model.text_embeddings(torch.tensor([template.prefix_ids]))
    suffix = model.text_embeddings(torch.tensor([template.suffix_ids]))
    assert torch.equal(inputs[:, :p], prefix.expand(3, -1, -1))
    assert torch.equal(inputs[:, p : p + 448], virtual)
    assert torch.equal(inputs[:, p + 448 :], suffix.expand(3, -1, -1))


def test_student_hidden_is_the_final_norm_output_at_the_last_position(make):
    model = make()
    virtual = torch.randn(2, 448, model.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.02
    with torch.no_grad():
        got = model.student_hidden(virtual)
        out = model.llm(inputs_embeds=model.student_inputs(virtual), output_hidden_states=True)
    torch.testing.assert_close(got, out.hidden_states[-1][:, -1], atol=ATOL, rtol=0)
    # It is the LM head's input: it gives the model's own next-token logits.
    torch.testing.assert_close(model.llm.lm_head(got), out.logits[:, -1], atol=ATOL, rtol=0)


def test_with_transcript_embeddings_in_place_of_virtual_tokens_the_student_is_the_teacher(make, tokenizer):
    """The student's LLM path with t_text where t_audio goes reproduces the cached h_teacher."""
    model = make()
    ids = transcript_ids(tokenizer, "What is the weather like today?")
    teacher = compute_targets(model.llm, model.template, [ids]).hidden
    student = model.student_hidden(model.text_embeddings(torch.tensor([ids])))
    torch.testing.assert_close(student, torch.from_numpy(teacher), atol=ATOL, rtol=0)


def test_mean_embedding_init_starts_the_virtual_tokens_at_the_mean_text_embedding(make):
    table = make().llm.get_input_embeddings().weight.detach()
    mean = table.mean(0)
    text_spread = (table - mean).norm(dim=-1).mean()  # how far a text token sits from the mean
    x = features(2)
    with torch.no_grad():
        near = make(projection_init="mean_embedding").virtual_tokens(x)
        far = make(projection_init="default").virtual_tokens(x)
    assert (near.mean((0, 1)) - mean).norm() < 0.2 * text_spread
    assert (near - mean).norm(dim=-1).max() < 0.5 * text_spread  # every token starts near the mean
    assert near.std((0, 1)).min() > 0  # but the tokens are not all equal: the Q-Former gets a gradient
    assert (far.mean((0, 1)) - mean).norm() > 2 * text_spread


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_are_static_and_examples_independent(make, batch):
    model = make()
    x = features(batch, seed=batch)
    with torch.no_grad():
        virtual, h, _ = model(x)
        alone = [model(x[i : i + 1])[:2] for i in range(batch)]
    assert virtual.shape == (batch, 448, model.hidden_size) and h.shape == (batch, model.hidden_size)
    assert model.student_inputs(virtual).shape == (batch, 458, model.hidden_size)
    for i, (v, hi) in enumerate(alone):
        torch.testing.assert_close(virtual[i : i + 1], v, atol=ATOL, rtol=0)
        torch.testing.assert_close(h[i : i + 1], hi, atol=ATOL, rtol=0)


def test_frozen_parts_stay_in_eval_mode(make):
    model = make().train()
    assert model.training and model.qformer.training
    assert not any(m.training for m in model.encoder.modules())
    assert not any(m.training for m in model.llm.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_activation_checkpointing_recomputes_the_llm_layers_with_the_same_gradients(tokenizer, template):
    # Fresh frozen parts: enabling checkpointing changes the LLM module in place.
    cfg = ModelConfig(whisper="tiny")
    plain = DiVA(tiny_whisper(0), tiny_llama(len(tokenizer), seed=0), template, cfg)
    checkpointed = DiVA(tiny_whisper(0), tiny_llama(len(tokenizer), seed=0), template, cfg)
    checkpointed.enable_activation_checkpointing()
    x = features(2)
    grads, calls = [], []
    for model in (plain, checkpointed):
        model.train()
        seen: list[None] = []
        model.llm.model.layers[0].self_attn.register_forward_hook(lambda *args, seen=seen: seen.append(None))
        h = model(x).h_student
        h.mean().backward()
        grads.append({k: p.grad for k, p in model.trainable_parameters().items()})
        calls.append(len(seen))
    assert calls == [1, 2]  # the checkpointed layer ran again in the backward pass
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=ATOL, rtol=0, msg=name)
    # Only the layer modules themselves are in training mode (HF checkpoints only then), nothing inside them.
    training = [m for m in checkpointed.llm.modules() if m.training]
    assert len(training) == 2 and all(isinstance(m, GradientCheckpointingLayer) for m in training)


def test_trainable_weights_round_trip(make):
    source, target = make(projection_init="mean_embedding"), make()
    with torch.no_grad():
        source.queries.add_(1.0)
    target.load_trainable({k: p.detach().clone() for k, p in source.trainable_parameters().items()})
    x = features(1)
    with torch.no_grad():
        torch.testing.assert_close(target(x)[1], source(x)[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        target.load_trainable({"queries": source.queries.detach()})


def test_build_student_device_override_and_dtype_follow_the_teacher(tokenizer):
    cfg = load_config("tiny", ["teacher.device=cuda"])
    model = build_student(cfg, tokenizer, device="cpu")
    assert model.queries.device.type == "cpu" and model.queries.dtype == torch.float32
    assert model.llm.device.type == "cpu"


def test_float32_trainable_parts_drive_a_bfloat16_llm(tokenizer, template):
    """Mixed precision: the trained parts keep float32 weights while the frozen LLM runs in bf16."""
    llm = tiny_llama(len(tokenizer), seed=0, dtype=torch.bfloat16)
    model = DiVA(tiny_whisper(0), llm, template, ModelConfig(whisper="tiny", projection_init="mean_embedding"))
    virtual, h, _ = model(features(1))
    assert virtual.dtype == torch.float32 and h.dtype == torch.bfloat16
    h.float().mean().backward()
    assert model.queries.grad.dtype == torch.float32 and model.queries.grad.abs().sum() > 0
