"""Stage 1: `python -m jobs.prepare --input <CommonVoice release> --output <dir or gs://...>`."""

from __future__ import annotations

import json

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--input", required=True,
                   help="CommonVoice locale dir (holding clips/ and <split>.tsv), local or gs://")
    p.add_argument("--output", required=True, help="output dataset dir, local or gs://")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output of another plan first")
    args = p.parse_args()
    cfg = _common.config(args)
    _common.init_ray()
    from pipeline.prepare import run_prepare

    manifest = run_prepare(cfg, args.input, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, **manifest["counts"]}, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
