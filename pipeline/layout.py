"""The names of what the stages write, defined once: every writer and every reader imports them.

Free of heavy imports (no torch, no transformers), so that Ray Data tasks can use it cheaply.
"""

from __future__ import annotations

# Every dataset (any fsspec URL): the plan first, the manifest last (its presence = complete).
PLAN = "_plan.json"
MANIFEST = "manifest.json"
REJECTS_DIR = "rejects"

# Stage 1, prepare.
MELS_KIND = "mels"
MELS_DIR = "mels"
ROW_REJECTS_FILE = "rows.parquet"  # TSV rows that never became clips, under REJECTS_DIR

# Stage 2, teacher.
TEACHER_KIND = "teacher"
TARGETS_DIR = "targets"

# Stage 3, train: Ray Train's run directory under a training output holds checkpoint_* directories.
TRAIN_RUN = "train"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.jsonl"

# The embedded default's stage outputs under its --output directory.
LOCAL_STAGES = ("mels", "teacher", "train", "model", "eval")
