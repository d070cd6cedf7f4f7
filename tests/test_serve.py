"""Serve: the OpenAI-compatible endpoint on a real local Ray Serve, driven by the official `openai` client.

One application for the module (a tiny random export on the session Ray). Its answers are compared with
`jobs.ask` and pipeline.ask's in-process answers on the same clips; bad requests get OpenAI-style 4xx errors and
the server goes on answering. The request parsing is also tested on its own, without Ray.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from helpers import free_port

from pipeline.ask import answer, generate, llm_inputs, load_audio, prompt_template
from pipeline.config import load_config
from pipeline.export import export_untrained, load_model
from pipeline.serve import WEB_DIR, RequestError, parse_request

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "tests" / "fixtures" / "commonvoice" / "clips"
CLIP = CLIPS / "common_voice_en_18327603.mp3"
OTHER = CLIPS / "common_voice_en_20517582.mp3"
EIGHT = sorted(CLIPS.glob("*.mp3"))[:8]
LONG_CLIP = CLIPS / "common_voice_en_39243377.mp3"  # 33.2 s
INSTRUCTION = "Reply briefly, like a pirate."
NAME = "tiny-diva"
MAX_BODY = 1_000_000
TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return Path(export_untrained(load_config("tiny"), str(tmp_path_factory.mktemp("serve") / "model")))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def base_url(ray_local, model_dir):
    """The application, as jobs.serve starts it, on 127.0.0.1 and a free port; shut down after the module."""
    from ray import serve

    from pipeline.serve import application

    port = free_port()
    cfg = load_config("tiny", [f"serve.model_name={NAME}", f"serve.max_body_bytes={MAX_BODY}",
                               "serve.batching=true", "serve.batch_wait_s=0.05"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(str(model_dir), cfg), name="diva", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def audio_part(path: Path | bytes, fmt: str = "mp3") -> dict:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def question(path: Path | bytes = CLIP, prompt: str | None = None, fmt: str = "mp3") -> list[dict]:
    parts = [audio_part(path, fmt)] + ([{"type": "text", "text": prompt}] if prompt else [])
    return [{"role": "user", "content": parts}]


def ask(client, path=CLIP, prompt=None, stream=False, **kwargs):
    """(text, finish_reason, usage) of one request, streamed or not."""
    kwargs.setdefault("max_tokens", TOKENS)
    out = client.chat.completions.create(model=NAME, messages=question(path, prompt), stream=stream, **kwargs)
    if not stream:
        return out.choices[0].message.content, out.choices[0].finish_reason, out.usage
    chunks = list(out)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    usage = chunks[-1].usage if not chunks[-1].choices else None
    finish = with_choices[-1].choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    return "".join(c.choices[0].delta.content or "" for c in with_choices), finish, usage


# --- answers ---------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, model_dir):
    """The one model, with the longest clip it answers: its encoder window or its training's clip limit, the shorter
    (read here from the export's config.json)."""
    config = json.loads((model_dir / "config.json").read_text())
    longest = min(config["features"]["chunk_length_s"], config["audio_checks"]["max_duration_s"])
    assert [m.id for m in client.models.list()] == [NAME]
    listed = client.models.retrieve(NAME)
    assert listed.id == NAME and listed.model_extra["max_audio_seconds"] == longest


def test_streamed_and_whole_answers_equal_jobs_ask(client, model_dir, loaded):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "jobs.ask", "--model", str(model_dir), "--audio", str(CLIP),
                           "--prompt", INSTRUCTION, "--max-new-tokens", str(TOKENS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = done.stdout.removesuffix("\n")
    model, tokenizer = loaded
    ids = list(generate(model, tokenizer, load_audio(CLIP), prompt=INSTRUCTION, max_new_tokens=TOKENS))
    prompt_tokens = llm_inputs(model, prompt_template(model, tokenizer, INSTRUCTION), load_audio(CLIP)).shape[1]
    finish = "length" if len(ids) == TOKENS else "stop"

    text, reason, usage = ask(client, prompt=INSTRUCTION)
    assert (text, reason) == (expected, finish) and expected
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(ids))
    assert usage.total_tokens == prompt_tokens + len(ids)
    text, reason, usage = ask(client, prompt=INSTRUCTION, stream=True, stream_options={"include_usage": True},
                              max_tokens=None, max_completion_tokens=TOKENS)
    assert (text, reason) == (expected, finish)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(ids))


def test_sampling_follows_temperature_and_seed(client, loaded):
    model, tokenizer = loaded
    hot = [ask(client, temperature=2.0, seed=s)[0] for s in (5, 5, 6)]
    assert hot[0] == hot[1] != hot[2]
    ids = list(generate(model, tokenizer, load_audio(CLIP), max_new_tokens=TOKENS, temperature=2.0, seed=5))
    assert hot[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert ask(client, temperature=0)[0] == answer(model, tokenizer, CLIP, max_new_tokens=TOKENS)


def test_eight_concurrent_requests_are_all_answered_correctly(client, loaded):
    """Eight clips, instructions and seeds at once, half streamed: each answer is its own question's. (The tiny
    random model's greedy answers are nearly all alike; sampled ones differ, so a mixed-up answer would show.)"""
    model, tokenizer = loaded
    cases = [(clip, INSTRUCTION if i % 2 else None, i, i % 3 == 0) for i, clip in enumerate(EIGHT)]
    expected = [answer(model, tokenizer, clip, prompt=prompt, max_new_tokens=TOKENS, temperature=1.0, seed=seed)
                for clip, prompt, seed, _ in cases]
    assert len(set(expected)) == 8

    def one(case):
        clip, prompt, seed, stream = case
        return ask(client, clip, prompt, stream=stream, temperature=1.0, seed=seed)[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, cases))
    assert got == expected


# --- bad requests ---------------------------------------------------------------------------------------


def wav_bytes(seconds: float, amplitude: float = 0.3) -> bytes:
    n = int(seconds * 16000)
    out = io.BytesIO()
    sf.write(out, amplitude * np.sin(np.arange(n) / 16000 * 2 * np.pi * 220).astype(np.float32), 16000, format="WAV")
    return out.getvalue()


BAD = [  # (status, OpenAI's error class, message pattern, param, request kwargs)
    (404, openai.NotFoundError, "The model `nope` does not exist", "model", {"model": "nope"}),
    (400, openai.BadRequestError, "no audio", "messages",
     {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    (400, openai.BadRequestError, "undecodable", "messages[0].content[0].input_audio",
     {"messages": question(b"this is not audio at all" * 40)}),
    (400, openai.BadRequestError, r"too long: 33\.\d\d s .*30 s window", "messages[0].content[0].input_audio",
     {"messages": question(LONG_CLIP)}),
    (400, openai.BadRequestError, "silent", "messages[0].content[0].input_audio",
     {"messages": question(wav_bytes(2.0, 0.0), fmt="wav")}),
    (400, openai.BadRequestError, "not valid base64", "messages[0].content[0].input_audio.data",
     {"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "%%%", "format": "wav"}}]}]}),
    (400, openai.BadRequestError, "format 'ogg' is not one of wav, mp3, flac",
     "messages[0].content[0].input_audio.format", {"messages": question(fmt="ogg")}),
    (400, openai.BadRequestError, "2 input_audio parts", "messages[1].content[0].input_audio",
     {"messages": question() + question(OTHER)}),
    (400, openai.BadRequestError, "no earlier assistant", "messages[1].role",
     {"messages": question() + [{"role": "assistant", "content": "Hi"}]}),
    (400, openai.BadRequestError, "`max_tokens` must be >= 1", "max_tokens", {"max_tokens": 0}),
    (400, openai.BadRequestError, "exceed the LLM's", "max_tokens", {"max_tokens": 100000}),
    (400, openai.BadRequestError, "`temperature` must be between 0 and 2", "temperature", {"temperature": 3}),
    (400, openai.BadRequestError, "`seed` must be int", "seed", {"seed": "x"}),
    (400, openai.BadRequestError, "`n`=2 is not supported", "n", {"n": 2}),
]


@pytest.mark.parametrize("status, error, message, param, kwargs", BAD, ids=[b[2].split()[0] + str(i)
                                                                             for i, b in enumerate(BAD)])
def test_a_bad_request_gets_an_openai_error(client, status, error, message, param, kwargs):
    request = {"model": NAME, "messages": question(), "max_tokens": TOKENS, **kwargs}
    for stream in (False, True):
        with pytest.raises(error) as info:
            client.chat.completions.create(stream=stream, **request)
        assert info.value.status_code == status
        body = info.value.body  # the client hands over the `error` object
        assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
        assert body["type"] == "invalid_request_error"
        assert re.search(message, body["message"]), body["message"]


def test_malformed_and_oversized_bodies_and_unknown_routes(base_url, client):
    url = f"{base_url}/v1/chat/completions"
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"model": NAME, "messages": "hi"}).encode(), 400, "`messages` is required"),
        (json.dumps({"model": NAME, "messages": question(b"\0" * MAX_BODY)}).encode(), 413,
         f"exceeds this server's limit of {MAX_BODY} bytes"),
    ]
    for body, status, message in cases:
        got = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert got.status_code == status, got.text
        assert message in got.json()["error"]["message"]
    # Sent in chunks without a Content-Length: refused once the bytes read pass the limit.
    got = httpx.post(url, content=iter([b"x" * 400_000] * 3), timeout=60)
    assert got.status_code == 413 and "exceeds" in got.json()["error"]["message"]
    got = httpx.get(f"{base_url}/v1/nothing-here", timeout=60)
    assert got.status_code == 404 and set(got.json()["error"]) == {"message", "type", "param", "code"}
    # ... and the server still answers.
    assert ask(client)[0] == ask(client, stream=True)[0]


def test_the_web_page_route(base_url):
    """GET / is pipeline/web/index.html when the page exists (404 otherwise); nothing outside that directory."""
    page = WEB_DIR / "index.html"
    got = httpx.get(f"{base_url}/", timeout=60)
    if page.is_file():
        assert got.status_code == 200 and got.content == page.read_bytes()
    else:
        assert got.status_code == 404
    for escape in ("/../serve.py", "/%2e%2e/serve.py", "/..%2fserve.py", "/%2e%2e/%2e%2e/pyproject.toml"):
        got = httpx.get(f"{base_url}{escape}", timeout=60)
        assert got.status_code == 404, (escape, got.text[:200])
        assert b"def parse_request" not in got.content and b"[project]" not in got.content


# --- parsing, without Ray -------------------------------------------------------------------------------


def test_parse_request_reads_openai_fields():
    body = {"model": NAME, "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 5,
            "max_tokens": 9, "temperature": 1, "seed": 3,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "In French."}, audio_part(b"abc")]}]}
    got = parse_request(body, NAME, 256)
    assert got.audio == b"abc" and got.prompt == "Be brief.\n\nIn French."
    assert (got.max_tokens, got.temperature, got.seed, got.stream, got.include_usage) == (5, 1.0, 3, True, True)
    plain = parse_request({"model": NAME, "messages": question(b"abc")}, NAME, 256)
    assert (plain.max_tokens, plain.temperature, plain.seed, plain.prompt, plain.stream) == (256, 0.0, None, None,
                                                                                            False)


@pytest.mark.parametrize("change, message", [
    ({"model": None}, "`model` is required"),
    ({"messages": []}, "`messages` is required"),
    ({"messages": [{"role": "system", "content": [audio_part(b"abc")]}]}, "a system message takes text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "not 'image_url'"),
    ({"messages": [{"role": "user", "content": 3}]}, "a string or a list"),
    ({"stream_options": {"include_usage": True}}, "only allowed with stream"),
    ({"max_tokens": True}, "`max_tokens` must be int"),
    ({"temperature": "hot"}, "`temperature` must be int or float"),
    ({"top_p": 0.5}, "`top_p`=0.5 is not supported"),
])
def test_parse_request_refuses_bad_fields(change, message):
    body = {"model": NAME, "messages": question(b"abc"), **change}
    with pytest.raises(RequestError, match=message.replace("`", ".").replace("(", r"\(")) as info:
        parse_request({k: v for k, v in body.items() if v is not None}, NAME, 256)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"
