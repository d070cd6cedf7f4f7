"""Serve: `python -m jobs.serve --model <model dir> [--host H] [--port P] [--replicas N] [--name NAME] [--batching]`.

Runs the model directory as a Ray Serve application with an OpenAI-compatible endpoint
(POST /v1/chat/completions with input_audio, GET /v1/models; pipeline/serve.py) on http://HOST:PORT
(127.0.0.1:8000 unless configured), until interrupted. Joins the cluster in RAY_ADDRESS, else starts a
local Ray. The flags are the config keys serve.host, serve.port, serve.num_replicas, serve.model_name,
serve.batching, eval.device, ...; other serve.* keys as KEY=VALUE. To deploy on a cluster from a config file
instead: `serve deploy infra/ray/serve.yaml` (the same application).
"""

from __future__ import annotations

import signal
import threading

from jobs import _common

ALIASES = {"--host": "serve.host", "--port": "serve.port", "--replicas": "serve.num_replicas",
           "--name": "serve.model_name", "--batching": "serve.batching", "--max-tokens": "serve.max_tokens",
           "--device": "eval.device", "--dtype": "eval.dtype", "--whisper": "eval.whisper", "--llm": "eval.llm"}


def run() -> int:
    p = _common.parser(__doc__, aliases=ALIASES)
    p.add_argument("--model", required=True, help="model directory written by jobs.export (local or gs://)")
    args, cfg = _common.parse(p)

    from pipeline.export import read_config

    read_config(args.model)  # a missing or incomplete directory (local or gs://) fails here, not in a replica
    _common.init_ray()
    from ray import serve

    from pipeline.builders import resolve
    from pipeline.serve import application, default_model_name, require_replicas

    require_replicas(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application(resolve(args.model), cfg), name="diva", route_prefix="/")  # replicas have their own cwd
    name = cfg.serve.model_name or default_model_name(args.model)
    print(f"serving {name!r} at http://{cfg.serve.host}:{cfg.serve.port}/v1/chat/completions (Ctrl-C stops)",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.delete("diva")
    return 0


if __name__ == "__main__":
    _common.main(run)
