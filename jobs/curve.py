"""Learning curve: `python -m jobs.curve <run dir> --mels <prepare output> --output <dir> [--untrained <model dir>]`.

Exports every kept checkpoint of a training run (<run>/train/checkpoint_*; keep more with
train.keep_checkpoints) and answers the held-out spoken questions of eval.split with all of them in one pass,
beside the cascade and, with --untrained (`jobs.export --untrained`), the untrained student as step 0. Writes
curve.json, curve.png (first-token agreement, KL and answer word-F1 against examples seen) and every answer
under --output (layout: pipeline/curve.py). The other settings are the config's eval.* keys.
"""

from __future__ import annotations

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__)
    p.add_argument("run", help="a training run's --output (local or gs://)")
    p.add_argument("--mels", required=True, help="the prepare stage's output holding eval.split's spoken questions")
    p.add_argument("--output", required=True, help="directory for the curve (local or gs://)")
    p.add_argument("--untrained", help="the untrained student's model directory, drawn as step 0")
    args, cfg = _common.parse(p)
    from pipeline import layout
    from pipeline.curve import learning_curve
    from pipeline.export import read_config

    _common.check_inputs((args.mels, layout.MELS_KIND))
    if args.untrained:
        read_config(args.untrained)
    _common.init_ray()
    curve = learning_curve(args.run, args.mels, args.output, cfg.eval, untrained=args.untrained)
    return _common.print_json(curve)


if __name__ == "__main__":
    _common.main(run)
