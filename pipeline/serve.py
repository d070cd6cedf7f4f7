"""Serve: a model directory behind an OpenAI-compatible chat endpoint, on Ray Serve.

`POST /v1/chat/completions` takes OpenAI's chat format with audio input: a user message holds one
`input_audio` content part (base64 wav/mp3/flac) and optional `text` parts, the instruction (as `jobs.ask
--prompt`; system/developer messages count as instruction too). The answer comes back whole, with usage
counts, or with `stream: true` as server-sent `chat.completion.chunk` events ending in `data: [DONE]`.
`GET /v1/models` lists the one model; `GET /` serves the page in pipeline/web/ when there is one.

The pure core (no Ray): `parse_request` turns a body into an `AskRequest` or a `RequestError` (an HTTP status
and OpenAI's error body), `Answerer` answers one through pipeline.ask (the same audio front end as prepare, the
same transformers `generate`: one generation path for the CLI and the server), and the `*_body` helpers write
OpenAI's JSON. The Ray part: `Endpoint` (a Serve deployment with a FastAPI ingress) and `build_app`, the
application builder that `python -m jobs.serve` and a Serve config file (infra/ray/serve.yaml) both use.
Defaults that differ from OpenAI's: temperature 0 (greedy, as `jobs.ask`) when a request gives none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from pipeline import PipelineError
from pipeline import ask as asking
from pipeline.config import Config, ConfigError, ServeConfig, from_dict, load_config

AUDIO_FORMATS = ("wav", "mp3", "flac")
WEB_DIR = Path(__file__).parent / "web"
# Requests asking for what this endpoint does not do get a clear 400, not a silently different answer.
UNSUPPORTED = {"n": 1, "top_p": 1, "stop": None, "logprobs": False, "tools": None, "audio": None}


class RequestError(PipelineError, ValueError):
    """A request the endpoint refuses: an HTTP status and the fields of OpenAI's error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class AskRequest:
    """What one chat request asks: the clip's bytes, the instruction and the sampling settings."""

    audio: bytes
    audio_param: str  # where the audio is in the request, for error messages
    prompt: str | None
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    include_usage: bool


# --- parsing ---------------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def parse_request(body: Mapping[str, Any], model_name: str, default_max_tokens: int) -> AskRequest:
    """A /v1/chat/completions body -> AskRequest; anything missing, ill-typed or unsupported -> RequestError
    naming the field (OpenAI's `param`)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("`model` is required: a string naming the model (GET /v1/models lists it)", param="model")
    if model != model_name:
        raise RequestError(f"The model `{model}` does not exist; this server serves `{model_name}`", status=404,
                           param="model", code="model_not_found")
    for name, default in UNSUPPORTED.items():
        if body.get(name) not in (None, default):
            raise RequestError(f"`{name}`={body[name]!r} is not supported by this endpoint (leave it out)", param=name)
    audio, param, prompt = _messages(body.get("messages"))
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if options and not stream:
        raise RequestError("`stream_options` is only allowed with stream: true", param="stream_options")
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.")
    max_tokens = _typed(body, "max_completion_tokens", int, None)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _typed(body, "max_tokens", int, default_max_tokens), "max_tokens"
    if max_tokens < 1:
        raise RequestError(f"`{key}` must be >= 1, not {max_tokens}", param=key)
    temperature = float(_typed(body, "temperature", (int, float), 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"`temperature` must be between 0 and 2, not {temperature}", param="temperature")
    seed = _typed(body, "seed", int, None)
    return AskRequest(audio, param, prompt, max_tokens, temperature, seed, stream, include_usage)


def _typed(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any, where: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RequestError(f"`{where}{name}` must be {names.replace('dict', 'an object')}, not {value!r}"[:300],
                           param=where + name)
    return value


def _messages(messages: Any) -> tuple[bytes, str, str | None]:
    """(audio bytes, where it is, instruction or None) from `messages`: one input_audio part in a user message;
    text parts of user messages and system/developer messages make the instruction."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` is required: a non-empty list of chat messages", param="messages")
    audio: list[tuple[bytes, str]] = []
    texts: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with `role` and `content`", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user"):
            raise RequestError(f"{where}.role {role!r}: this endpoint answers one spoken question, from "
                               "system/developer/user messages (no earlier assistant or tool turns)",
                               param=f"{where}.role")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        for j, part in enumerate(parts):
            texts, audio = _part(part, f"{where}.content[{j}]", role, texts, audio)
    if not audio:
        raise RequestError("no audio: the question must be an `input_audio` content part (base64 "
                           f"{'/'.join(AUDIO_FORMATS)}) in a user message", param="messages")
    if len(audio) > 1:
        raise RequestError(f"{len(audio)} input_audio parts: this endpoint answers one spoken question per request",
                           param=audio[1][1])
    prompt = "\n\n".join(t for t in texts if t.strip()) or None
    return audio[0][0], audio[0][1], prompt


def _part(part: Any, where: str, role: str, texts: list[str], audio: list[tuple[bytes, str]]
          ) -> tuple[list[str], list[tuple[bytes, str]]]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return [*texts, part["text"]], audio
    if kind != "input_audio" or role != "user":
        allowed = "text and input_audio" if role == "user" else "text"
        raise RequestError(f"{where}: a {role} message takes {allowed} parts, not {kind or part!r}"[:300], param=where)
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise RequestError(f"{where}.input_audio must be {{\"data\": <base64>, \"format\": ...}}",
                           param=f"{where}.input_audio")
    if spec.get("format") not in AUDIO_FORMATS:
        raise RequestError(f"{where}.input_audio.format {spec.get('format')!r} is not one of "
                           f"{', '.join(AUDIO_FORMATS)}", param=f"{where}.input_audio.format")
    try:
        data = base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}.input_audio.data is not valid base64: {exc}",
                           param=f"{where}.input_audio.data") from None
    return texts, [*audio, (data, f"{where}.input_audio")]


# --- answering --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One answer as it is produced: `pieces` of text (iterate it once) and the counts OpenAI reports."""

    pieces: Iterator[str]
    prompt_tokens: int
    stops: set[int]
    ids: list[int] = dataclasses.field(default_factory=list)
    stop: Callable[[], None] = lambda: None  # the reader is gone: generation ends at its next token

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)  # the stop token included: the model generated it

    @property
    def finish_reason(self) -> str:
        return "stop" if self.ids and self.ids[-1] in self.stops else "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Answerer:
    """A loaded model answering AskRequests through pipeline.ask. Blocking calls: a server runs them in threads."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.fcfg, self.checks = model.audio_settings
        self.max_seconds = asking.max_audio_seconds(self.fcfg, self.checks)
        # A fast tokenizer's encode changes its own settings as it goes: two threads at once garble the chat
        # template (seen as special tokens split into characters). Every use of it takes this lock.
        self.lock = threading.Lock()

    def features(self, request: AskRequest) -> torch.Tensor:
        """The clip's encoder input; bad audio -> RequestError (400) naming the part and the reason."""
        try:
            return asking.audio_features(request.audio, request.audio_param, self.fcfg, self.checks)
        except asking.AudioTooLong as exc:
            raise RequestError(str(exc), param=request.audio_param, code="audio_too_long") from None
        except asking.AudioError as exc:
            raise RequestError(str(exc), param=request.audio_param, code="invalid_audio") from None

    def encode(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Virtual tokens [1, Q, H] of each clip, from one encoder and Q-Former pass over all of them."""
        virtual = asking.audio_tokens(self.model, torch.cat(clips))
        return list(virtual.split(1))

    def start(self, request: AskRequest, virtual: torch.Tensor) -> Generation:
        """The answer's generation (starts producing when its pieces are first read)."""
        from pipeline.template import stop_ids

        with self.lock:
            template = asking.prompt_template(self.model, self.tokenizer, request.prompt)
            stops = stop_ids(self.model.llm, self.tokenizer, template)
            try:
                tokens = asking.generate(self.model, self.tokenizer, virtual=virtual, prompt=request.prompt,
                                         max_new_tokens=request.max_tokens, temperature=request.temperature,
                                         seed=request.seed)
            except asking.AskError as exc:
                raise RequestError(str(exc), param="max_tokens" if "max_new_tokens" in str(exc) else None) from None
        prompt_tokens = len(template.prefix_ids) + virtual.shape[1] + len(template.suffix_ids)
        gen = Generation(iter(()), prompt_tokens, stops, stop=tokens.stop)

        def counted() -> Iterator[int]:
            for token in tokens:
                gen.ids.append(token)
                yield token

        gen.pieces = asking.stream_text(_Locked(self.tokenizer, self.lock), counted())
        return gen


class _Locked:
    """The tokenizer's decode under the Answerer's lock (all that stream_text uses)."""

    def __init__(self, tokenizer: Any, lock: threading.Lock):
        self.tokenizer, self.lock = tokenizer, lock

    def decode(self, *args: Any, **kwargs: Any) -> str:
        with self.lock:
            return self.tokenizer.decode(*args, **kwargs)


# --- OpenAI's response bodies -------------------------------------------------------------------------------


def completion_body(cid: str, created: int, model: str, text: str, gen: Generation) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage()}


def chunk_body(cid: str, created: int, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    """One chat.completion.chunk; `delta` None: the usage chunk (no choices) that include_usage asks for."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = usage
    return body


def sse(obj: Mapping[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def models_body(name: str, created: int, max_audio_seconds: float) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(name, created, max_audio_seconds)]}


def model_body(name: str, created: int, max_audio_seconds: float) -> dict[str, Any]:
    """OpenAI's model object, plus `max_audio_seconds` (ours): the longest clip the model answers, which a client
    (the web page's recorder) can stop at instead of meeting a 400."""
    return {"id": name, "object": "model", "created": created, "owned_by": "diva-ray",
            "max_audio_seconds": max_audio_seconds}


def default_model_name(model_dir: str) -> str:
    """The model directory's own name (gs://b/runs/x/model -> model)."""
    return posixpath.basename(str(model_dir).rstrip("/")) or "diva"


# --- the application ----------------------------------------------------------------------------------------


def serve_args(args: Mapping[str, Any]) -> tuple[str, Config]:
    """A Serve config's `args` ({model, config?, overrides?}) -> (model directory, Config)."""
    unknown = sorted(set(args) - {"model", "config", "overrides"})
    if unknown:
        raise ConfigError(f"unknown application args {unknown}; expected model, config, overrides")
    model = args.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("application args: `model` (the model directory jobs.export wrote) is required")
    overrides = args.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("application args: `overrides` must be a list of key=value strings")
    return model, load_config(args.get("config"), overrides)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for `args` (see serve_args): what a Serve config's import_path names, and what
    jobs.serve runs. Replicas, their CPUs/GPU and concurrency come from the config's serve section."""
    return application(*serve_args(args))


def replica_options(cfg: Config) -> dict[str, float]:
    """One replica's Ray resources: serve.cpus_per_replica, and a GPU on eval.device=cuda."""
    return {"num_cpus": cfg.serve.cpus_per_replica, "num_gpus": 1 if cfg.eval.device == "cuda" else 0}


def require_replicas(cfg: Config) -> None:
    """The replicas fit on the cluster (pipeline.resources): else one line now, not Serve waiting for ever."""
    from pipeline.resources import require

    options = replica_options(cfg)
    require({"CPU": options["num_cpus"], "GPU": float(options["num_gpus"])}, cfg.serve.num_replicas,
            what=f"serving ({cfg.serve.num_replicas} replica(s) on eval.device={cfg.eval.device})",
            change="--replicas (serve.num_replicas), --device (eval.device) or serve.cpus_per_replica",
            timeout_s=cfg.cluster.autoscaler_timeout_s)


def application(model: str, cfg: Config) -> Any:
    """`Endpoint` for the model directory `model`, sized by cfg.serve (and a GPU each on eval.device=cuda)."""
    scfg = cfg.serve
    return Endpoint.options(num_replicas=scfg.num_replicas, max_ongoing_requests=scfg.max_ongoing_requests,
                            ray_actor_options=replica_options(cfg)).bind(model, cfg.to_dict())


@serve.deployment(name="diva")
@serve.ingress()
class Endpoint:
    """One replica: the model loaded once, requests answered concurrently in a thread pool."""

    def __init__(self, model: str, cfg: dict[str, Any]):
        from pipeline.export import load_model

        self.cfg: Config = from_dict(Config, cfg)
        ecfg, scfg = self.cfg.eval, self.cfg.serve
        if ecfg.device == "cpu":
            torch.set_num_threads(max(1, int(scfg.cpus_per_replica)))
        loaded, tokenizer = load_model(model, ecfg.device, getattr(torch, ecfg.dtype), whisper=ecfg.whisper,
                                       llm=ecfg.llm)
        self.answerer = Answerer(loaded, tokenizer)
        self.name = scfg.model_name or default_model_name(model)
        self.created = int(time.time())
        # Each streamed request holds a thread while it waits for its next token.
        self.pool = ThreadPoolExecutor(max_workers=2 * scfg.max_ongoing_requests + 2,
                                       thread_name_prefix="diva-serve")
        self._encode_batch.set_max_batch_size(scfg.batch_size)
        self._encode_batch.set_batch_wait_timeout_s(scfg.batch_wait_s)

    def __serve_build_asgi_app__(self) -> Any:
        return asgi_app(self)

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def virtual(self, clip: torch.Tensor) -> torch.Tensor:
        if self.cfg.serve.batching:
            return await self._encode_batch(clip)
        (virtual,) = await self.run(self.answerer.encode, [clip])
        return virtual

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self.run(self.answerer.encode, clips)


def asgi_app(endpoint: Any) -> Any:
    """The FastAPI app of one replica (`endpoint`: its model, config and thread pool)."""
    app = FastAPI(title="DiVA", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}"[:500], "server_error"),
                            status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(endpoint.name, endpoint.created, endpoint.answerer.max_seconds)

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != endpoint.name:
            raise RequestError(f"The model `{name}` does not exist; this server serves `{endpoint.name}`",
                               status=404, param="model", code="model_not_found")
        return model_body(endpoint.name, endpoint.created, endpoint.answerer.max_seconds)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        scfg: ServeConfig = endpoint.cfg.serve
        raw = await read_body(request, scfg.max_body_bytes)
        ask = parse_request(parse_json(raw), endpoint.name, scfg.max_tokens)
        clip = await endpoint.run(endpoint.answerer.features, ask)
        gen = await endpoint.run(endpoint.answerer.start, ask, await endpoint.virtual(clip))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if ask.stream:
            return StreamingResponse(events(endpoint, gen, ask, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = await endpoint.run(lambda: "".join(gen.pieces))
        finally:  # a client that hangs up (this task cancelled) stops its generation, as a finished one is
            gen.stop()
        return completion_body(cid, created, endpoint.name, text, gen)

    if WEB_DIR.is_dir():
        # Read-only, html=True: GET / is index.html; paths resolving outside the directory are refused.
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"the request body ({size} bytes or more) exceeds this server's limit of {limit} bytes "
                        "(serve.max_body_bytes)", status=413, code="request_too_large")


async def events(endpoint: Any, gen: Generation, ask: AskRequest, cid: str, created: int) -> Any:
    """The streamed answer as server-sent chat.completion.chunk events, then `data: [DONE]`."""
    name, usage = endpoint.name, ask.include_usage
    yield sse(chunk_body(cid, created, name, {"role": "assistant", "content": ""}, include_usage=usage))
    end = object()
    try:
        while (piece := await endpoint.run(next, gen.pieces, end)) is not end:
            yield sse(chunk_body(cid, created, name, {"content": piece}, include_usage=usage))
    except Exception as exc:  # the status line is sent: the error goes in the stream, as OpenAI's does
        yield sse(error_body(f"generation failed: {type(exc).__name__}: {exc}", "server_error"))
        return
    finally:  # the client hung up (or pressed the page's Stop): the generation ends at its next token
        gen.stop()
    yield sse(chunk_body(cid, created, name, {}, gen.finish_reason, include_usage=usage))
    if usage:
        yield sse(chunk_body(cid, created, name, None, usage=gen.usage(), include_usage=True))
    yield sse("[DONE]")

