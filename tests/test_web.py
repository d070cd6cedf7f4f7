"""The web page (pipeline/web/) in a real headless Chromium against the real Ray Serve application (what
`python -m jobs.serve` runs): a fixture clip uploaded through the page's file input answers with exactly the
endpoint's greedy answer, appended chunk by chunk as the server streams it; a recording from Chromium's fake
microphone is sent as a 16 kHz mono 16-bit WAV and answered as the endpoint answers that WAV; the server's error
for a clip over 30 s is shown on the page.

The browser is Debian's `chromium`, driven through the DevTools protocol (tests/browser.py); without it the
tests skip (.ci/run installs it)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
import soundfile as sf
from browser import Chromium, ask_on_page, chromium_binary
from helpers import free_port, nudged_run

from pipeline.config import load_config
from pipeline.export import export_checkpoint

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "tests" / "fixtures" / "commonvoice" / "clips"
CLIP = CLIPS / "common_voice_en_18327603.mp3"
LONG_CLIP = CLIPS / "common_voice_en_39243377.mp3"  # 33.2 s: the server refuses it
INSTRUCTION = "Reply briefly, like a pirate."
RECORD_LIMIT = 4  # s: the served model's max_audio_seconds (its window is 30 s); CLIP is 2.9 s
MAX_TOKENS = 32  # the page's "Max tokens" field and the direct request's max_tokens: short answers, quick tests


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny export whose trainable weights are nudged off their initialisation (answers of several tokens), trained
    on clips of up to RECORD_LIMIT s: the longest it answers, where the page's recorder stops."""
    run = nudged_run(tmp_path_factory.mktemp("web-run"), f"prepare.max_duration_s={RECORD_LIMIT}")
    return Path(export_checkpoint(str(run), str(tmp_path_factory.mktemp("web-export") / "model")))


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    """The application as jobs.serve starts it (pipeline.serve.application on Ray Serve), on the session Ray,
    127.0.0.1 and a free port; its base URL. Shut down after the module."""
    from ray import serve

    from pipeline.serve import application

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(str(model_dir), load_config("tiny")), name="diva", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0,
                    http_client=httpx.Client(trust_env=False, timeout=120))
    return client


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def browser():
    with Chromium() as b:
        yield b


def messages(audio: bytes, fmt: str, instruction: str | None = None) -> list[dict]:
    content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt}}]
    if instruction:
        content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]


def endpoint_answer(client, model_name, audio: bytes, fmt: str, instruction: str | None = None,
                    temperature: float = 0.0, seed: int | None = None) -> tuple[str, list[str], dict[str, int]]:
    """The endpoint's own answer (greedy by default), non-streamed, its streamed deltas (the non-empty ones) and
    the non-streamed answer's usage counts."""
    options = {"model": model_name, "messages": messages(audio, fmt, instruction), "temperature": temperature,
               "max_tokens": MAX_TOKENS, "seed": seed}
    whole = client.chat.completions.create(**options)
    stream = client.chat.completions.create(**options, stream=True)
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    usage = {"prompt_tokens": whole.usage.prompt_tokens, "completion_tokens": whole.usage.completion_tokens}
    return whole.choices[0].message.content, deltas, usage


def shown_usage(status: str) -> dict[str, int]:
    """The token counts the page shows under the answer ("...: 46 prompt tokens, 32 answer tokens ...")."""
    match = re.search(r"(\d+) prompt tokens, (\d+) answer tokens", status)
    assert match, status
    return {"prompt_tokens": int(match[1]), "completion_tokens": int(match[2])}


def assert_page_answer(page: dict, expected: str, deltas: list[str], usage: dict[str, int]) -> None:
    assert page["state"] == "done", page
    assert page["error"] is None and page["page_errors"] == []
    assert expected and page["text"] == expected
    # Streamed onto the page: one text node appended per streamed delta, the same pieces the server streams.
    assert page["chunks"] == deltas and len(deltas) > 1
    assert shown_usage(page["status"]) == usage


@pytest.mark.slow
@pytest.mark.parametrize("instruction", [INSTRUCTION, None], ids=["instruction", "no-instruction"])
def test_uploaded_clip_is_answered_as_the_endpoint_answers_it(server, client, model_name, browser, instruction):
    """Greedy (the page's default temperature 0): the page's answer is the endpoint's greedy answer, and the
    prompt it counts is the one with the instruction in it (more tokens than without)."""
    page = ask_on_page(browser, f"{server}/", CLIP, instruction, {"max-tokens": MAX_TOKENS})
    expected, deltas, usage = endpoint_answer(client, model_name, CLIP.read_bytes(), "mp3", instruction)
    assert_page_answer(page, expected, deltas, usage)
    if instruction:
        plain = endpoint_answer(client, model_name, CLIP.read_bytes(), "mp3")[2]
        assert usage["prompt_tokens"] > plain["prompt_tokens"]


@pytest.mark.slow
def test_sampling_settings_reach_the_endpoint(server, client, model_name, browser):
    """Temperature and seed from the page's settings: the same sampled answer as the endpoint's for that seed
    (a varied one: the tiny random model's greedy answer repeats one token)."""
    settings = {"max-tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7}
    page = ask_on_page(browser, f"{server}/", CLIP, INSTRUCTION, settings)
    expected, deltas, usage = endpoint_answer(client, model_name, CLIP.read_bytes(), "mp3", INSTRUCTION, 1.0, 7)
    assert_page_answer(page, expected, deltas, usage)
    assert len(set(deltas)) > 1
    greedy = endpoint_answer(client, model_name, CLIP.read_bytes(), "mp3", INSTRUCTION)[0]
    assert expected != greedy


def page_wav(browser) -> bytes:
    """The audio the page will send, as it holds it (its preview player's blob)."""
    wav = base64.b64decode(browser.evaluate("""fetch(document.getElementById("preview").src)
      .then((r) => r.blob()).then((b) => new Promise((ok) => {
        const f = new FileReader(); f.onload = () => ok(f.result.split(",")[1]); f.readAsDataURL(b); }))"""))
    info = sf.info(io.BytesIO(wav))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 16000, 1)
    return wav


@pytest.mark.slow
def test_a_recording_stops_at_the_model_s_limit_and_is_sent_as_16_khz_wav(server, client, model_name, browser):
    """Chromium's fake microphone (a beep): Record, and the page stops by itself at the served model's
    `max_audio_seconds` (RECORD_LIMIT, which GET /v1/models gives and the page states), then Ask. The WAV the page
    made is a 16 kHz mono 16-bit file no longer than the limit (the recorder stops at its first tick past it, and the
    page cuts that off), and the page's answer is the endpoint's answer to that very file."""
    assert client.models.list().data[0].model_extra["max_audio_seconds"] == RECORD_LIMIT
    browser.open(f"{server}/")
    browser.evaluate(f"document.getElementById('max-tokens').value = '{MAX_TOKENS}'")
    browser.click("#record")
    browser.wait_until("'recording' in document.getElementById('record').dataset")
    browser.wait_until("/Recording… [1-3] s/.test(document.getElementById('record-status').textContent)", 30)
    assert browser.evaluate("document.getElementById('max-seconds').textContent") == f"up to {RECORD_LIMIT} s"
    assert browser.evaluate("document.getElementById('record-status').textContent").endswith(
        f"(stops at {RECORD_LIMIT} s)")
    browser.wait_until("!document.getElementById('ask').disabled", 30)  # not pressed again: it stopped itself
    assert "recording" not in browser.evaluate("Object.keys(document.getElementById('record').dataset)")
    wav = page_wav(browser)
    assert RECORD_LIMIT - 1 < sf.info(io.BytesIO(wav)).duration <= RECORD_LIMIT
    browser.click("#ask")
    browser.wait_until("document.getElementById('answer').dataset.state !== 'idle'")
    assert browser.wait_answer(120) == "done"
    text = browser.evaluate("document.getElementById('answer').textContent")
    expected = endpoint_answer(client, model_name, wav, "wav")[0]
    assert expected and text == expected
    assert browser.page_errors() == []


@pytest.mark.slow
def test_a_format_the_endpoint_does_not_read_is_converted_to_wav(server, client, model_name, browser, tmp_path):
    """An Ogg Vorbis upload (the endpoint takes wav/mp3/flac): the page decodes it and sends 16 kHz mono WAV of
    the same length, answered as the endpoint answers that WAV."""
    audio, rate = sf.read(CLIP)
    ogg = tmp_path / "question.ogg"
    sf.write(ogg, audio, rate, format="OGG", subtype="VORBIS")
    page = ask_on_page(browser, f"{server}/", ogg, settings={"max-tokens": MAX_TOKENS})
    wav = page_wav(browser)
    assert abs(sf.info(io.BytesIO(wav)).duration - sf.info(ogg).duration) < 0.05
    assert page["state"] == "done" and page["page_errors"] == [], page
    assert page["text"] == endpoint_answer(client, model_name, wav, "wav")[0]
    assert "converted to WAV" in browser.evaluate("document.getElementById('clip-status').textContent")


@pytest.mark.slow
def test_the_servers_error_is_shown_on_the_page(server, client, model_name, browser):
    """A clip over 30 s: the endpoint's 400 and its message appear in the page's alert, and no answer."""
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=messages(LONG_CLIP.read_bytes(), "mp3"))
    message = info.value.body["message"]
    page = ask_on_page(browser, f"{server}/", LONG_CLIP)
    assert page["state"] == "error" and page["text"] == ""
    assert page["error"] == f"The request failed: 400: {message}"
    assert "too long" in message and page["page_errors"] == []
