"""Stage 1: `python -m jobs.prepare --input <CommonVoice release> --output <dir or gs://...>`."""

from __future__ import annotations

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__, dataset_output=True)
    p.add_argument("--input", required=True,
                   help="CommonVoice locale dir (holding clips/ and <split>.tsv), local or gs://")
    args, cfg = _common.parse(p)
    _common.init_ray()
    from pipeline.prepare import run_prepare

    return _common.report(args.output, run_prepare(cfg, args.input, args.output, overwrite=args.overwrite))


if __name__ == "__main__":
    _common.main(run)
