"""Export: `python -m jobs.export --checkpoint <checkpoint dir | run dir> --output <model dir> [--overwrite]`,
or `python -m jobs.export --untrained --config <preset|yaml> --output <model dir>`.

--checkpoint is one checkpoint directory (local or gs://), or a training run's --output directory:
then its latest complete checkpoint (<run>/train/checkpoint_*) is exported, or, when that one's weights fail
their checksums (a cut or corrupt copy), the newest one before it that passes, with a warning naming both.
--untrained exports the student as a run with this config initialises it (step 0), the baseline to compare
a trained model with. The output directory is what `python -m jobs.ask --model` and the evaluate job load.
"""

from __future__ import annotations

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint dir or training run dir (local or gs://)")
    source.add_argument("--untrained", action="store_true", help="the student at its initialisation (--config's)")
    p.add_argument("--output", required=True, help="model directory to write (local or gs://)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding something else")
    args, cfg = _common.parse(p)
    from pipeline.export import export_checkpoint, export_untrained, open_checkpoint

    if args.untrained:
        return _common.print_json({"checkpoint": None, "output": export_untrained(cfg, args.output,
                                                                                  overwrite=args.overwrite)})
    checkpoint = open_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, args.output, overwrite=args.overwrite)
    return _common.print_json({"checkpoint": checkpoint.url, "step": checkpoint.state.step, "output": out})


if __name__ == "__main__":
    _common.main(run)
