"""Export: `python -m jobs.export --checkpoint <checkpoint dir | run dir> --output <model dir> [--overwrite]`.

--checkpoint is one checkpoint directory (local or gs://), or a training run's --output directory:
then its latest complete checkpoint (<run>/train/checkpoint_*) is exported. The output directory is
what `python -m jobs.ask --model` and the evaluate job load.
"""

from __future__ import annotations

import argparse
import json

from jobs import _common


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or training run dir (local or gs://)")
    p.add_argument("--output", required=True, help="model directory to write (local or gs://)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding something else")
    args = p.parse_args()
    from pipeline.export import export_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, args.output, overwrite=args.overwrite)
    print(json.dumps({"checkpoint": checkpoint, "output": out}, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
