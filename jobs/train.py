"""Stage 3: `python -m jobs.train --config <preset|yaml> --mels <...> --teacher <...> --output <...> [k=v ...]`.

Resubmitting the same command resumes from the latest checkpoint under <output>/train. Exit codes: 0 when the
run reached its last step; 75 (EX_TEMPFAIL) when a training worker got SIGTERM (a spot VM being reclaimed) and
the run stopped at the next step boundary with a checkpoint: submit the same command again to resume; 1 for
a bad config or input.
"""

from __future__ import annotations

from jobs import _common
from pipeline import layout


def run() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--mels", required=True, help="the prepare stage's output (local or gs://)")
    p.add_argument("--teacher", required=True, help="the teacher stage's cache (local or gs://)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, logs (local or gs://)")
    args, cfg = _common.parse(p)
    _common.check_inputs((args.mels, layout.MELS_KIND), (args.teacher, layout.TEACHER_KIND))
    _common.init_ray()
    from pipeline.train import PREEMPTED_EXIT, preempted, run_training

    result = run_training(cfg, args.mels, args.teacher, args.output)
    _common.print_json({"output": args.output, "metrics": result.metrics,
                        "checkpoint": result.checkpoint.path if result.checkpoint else None})
    return PREEMPTED_EXIT if preempted(result) else 0


if __name__ == "__main__":
    _common.main(run)
