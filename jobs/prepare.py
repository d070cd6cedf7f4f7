"""Stage 1: `python -m jobs.prepare --input <dataset dir> --output <dir or gs://...>`.

The input is a CommonVoice release, Hugging Face Parquet or JSONL manifests, found by what it holds or named
with --layout (prepare.layout); see README "Stage 1: prepare".
"""

from __future__ import annotations

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__, dataset_output=True, aliases={"--layout": "prepare.layout"})
    p.add_argument("--input", required=True,
                   help="dataset dir, local or gs://: a CommonVoice locale dir (clips/ and <split>.tsv), Hugging "
                        "Face Parquet (data/<split>-00000-of-0000N.parquet or <split>/*.parquet with an audio "
                        "column) or JSONL manifests (<split>.jsonl: audio_filepath, text)")
    args, cfg = _common.parse(p)
    _common.init_ray()
    from pipeline.prepare import run_prepare

    return _common.report(args.output, run_prepare(cfg, args.input, args.output, overwrite=args.overwrite))


if __name__ == "__main__":
    _common.main(run)
