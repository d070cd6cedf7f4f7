"""Stage 2: `python -m jobs.cache_teacher --mels <prepare output> --output <dir or gs://...> [--model ...]`."""

from __future__ import annotations

import dataclasses

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__, dataset_output=True)
    p.add_argument("--mels", required=True, help="the prepare stage's output (local or gs://)")
    p.add_argument("--model", help="HF id or local dir of the LLM, or 'tiny' (overrides teacher.model)")
    p.add_argument("--device", choices=["cpu", "cuda", "xla"], help="overrides teacher.device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (teacher.dtype)")
    args = p.parse_args()
    cfg = _common.config(args)
    flags = {k: v for k, v in (("model", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    cfg.teacher = dataclasses.replace(cfg.teacher, **flags)
    _common.init_ray()
    from pipeline.teacher import run_teacher

    return _common.report(args.output, run_teacher(cfg, args.mels, args.output, overwrite=args.overwrite))


if __name__ == "__main__":
    _common.main(run)
