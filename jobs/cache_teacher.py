"""Stage 2: `python -m jobs.cache_teacher --mels <prepare output> --output <dir or gs://...> [--model ...]`."""

from __future__ import annotations

import dataclasses
import json

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--mels", required=True, help="the prepare stage's output (local or gs://)")
    p.add_argument("--output", required=True, help="output dataset dir, local or gs://")
    p.add_argument("--model", help="HF id or local dir of the LLM, or 'tiny' (overrides teacher.model)")
    p.add_argument("--device", choices=["cpu", "cuda", "xla"], help="overrides teacher.device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (teacher.dtype)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output of another plan first")
    args = p.parse_args()
    cfg = _common.config(args)
    flags = {k: v for k, v in (("model", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    cfg.teacher = dataclasses.replace(cfg.teacher, **flags)
    _common.init_ray()
    from pipeline.teacher import run_teacher

    manifest = run_teacher(cfg, args.mels, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, **manifest["counts"]}, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
