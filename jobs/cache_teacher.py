"""Stage 2: `python -m jobs.cache_teacher --mels <prepare output> --output <dir or gs://...> [--model ...]`.

--model, --device and --dtype are the config keys teacher.model, teacher.device and teacher.dtype.
teacher.device defaults to cuda (the paper's GPU teacher, one GPU per actor): on a machine without a GPU
pass --device cpu (the small, demo and tiny presets already do); a request the cluster cannot meet fails
at once, naming what it asked for.
"""

from __future__ import annotations

from jobs import _common
from pipeline import layout

ALIASES = {"--model": "teacher.model", "--device": "teacher.device", "--dtype": "teacher.dtype"}


def run() -> int:
    p = _common.parser(__doc__, dataset_output=True, aliases=ALIASES)
    p.add_argument("--mels", required=True, help="the prepare stage's output (local or gs://)")
    args, cfg = _common.parse(p)
    _common.check_inputs((args.mels, layout.MELS_KIND))
    _common.init_ray()
    from pipeline.teacher import run_teacher

    return _common.report(args.output, run_teacher(cfg, args.mels, args.output, overwrite=args.overwrite))


if __name__ == "__main__":
    _common.main(run)
