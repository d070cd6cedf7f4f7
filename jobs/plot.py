"""Plot a training run's loss: `python -m jobs.plot <run dir or gs://...> [--out loss.png]`.

Reads <run>/logs/metrics.jsonl (written by jobs.train) and draws both loss terms, their weighted
sum and the learning rate against the step; prints the first and last values.
"""

from __future__ import annotations

from jobs import _common


def run() -> int:
    p = _common.parser(__doc__, config=False)
    p.add_argument("run", help="the --output of jobs.train (local or gs://)")
    p.add_argument("--out", help="PNG path (default: <run>/loss.png)")
    args = p.parse_args()
    from pipeline import cache
    from pipeline.report import plot_loss, read_metrics, training_summary

    metrics = read_metrics(args.run)
    if not metrics:
        raise cache.DatasetError(f"{args.run}/logs/metrics.jsonl is empty: no step was logged yet")
    out = args.out or cache.join(args.run.rstrip("/"), "loss.png")
    plot_loss(metrics, out, title=f"DiVA: {args.run}")
    return _common.print_json({"plot": out, **training_summary(metrics)})


if __name__ == "__main__":
    _common.main(run)
