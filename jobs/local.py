"""The embedded default: every stage on the bundled corpus, on a local Ray, in one command.

    python -m jobs.local [--output runs/local] [--config tiny] [KEY=VALUE ...]

Stages are idempotent, so a second run only confirms the outputs (and a crashed run resumes).
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import _common

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "commonvoice"


def run() -> int:
    p = _common.parser(__doc__)
    p.set_defaults(config="tiny")
    p.add_argument("--input", default=str(CORPUS), help="CommonVoice release (default: the bundled corpus)")
    p.add_argument("--output", default=str(ROOT / "runs" / "local"), help="where every stage writes")
    args = p.parse_args()
    cfg = _common.config(args)
    _common.init_ray()
    from pipeline.prepare import run_prepare
    from pipeline.teacher import run_teacher

    out = Path(args.output)
    mels = run_prepare(cfg, args.input, str(out / "mels"))
    teacher = run_teacher(cfg, str(out / "mels"), str(out / "teacher"))
    report = {
        "mels": {"path": str(out / "mels"), **mels["counts"]},
        "teacher": {"path": str(out / "teacher"), "model": teacher["target"]["model"], **teacher["counts"]},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
