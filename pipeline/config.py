"""One typed config for every job: dataclasses, YAML presets, and `key=value` overrides.

A run is described by a single `Config`. Presets live in `pipeline/presets/` as partial YAML over the
dataclass defaults; a user's YAML file works the same way, and dotted overrides
(`prepare.rows_per_file=500`) are applied last. Unknown keys, ill-typed values and choices outside a
`Literal[...]` are refused when the config loads, naming the key (and the valid choices), so a typo
never silently falls back to a default and no later code re-checks a choice.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import PipelineError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(PipelineError, ValueError):
    """A config file, preset or override that does not fit the schema."""


Device = Literal["cpu", "cuda", "xla"]
Dtype = Literal["float32", "bfloat16", "float16"]
StoreDtype = Literal["bfloat16", "float16"]
TrainablePart = Literal["queries", "qformer", "projection"]
Layout = Literal["auto", "commonvoice", "hf_parquet", "jsonl"]
Logger = Literal["jsonl", "tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class FeatureConfig:
    """Whisper's log-Mel front end. Defaults are Whisper-large-v3's (128 bins, 30 s windows)."""

    sampling_rate: int = 16000
    n_mels: int = 128
    n_fft: int = 400
    hop_length: int = 160
    chunk_length_s: int = 30

    @property
    def n_samples(self) -> int:
        """Samples in one encoder window (480000): longer audio is cut, shorter zero-padded."""
        return self.chunk_length_s * self.sampling_rate

    @property
    def n_frames(self) -> int:
        """Frames of one padded encoder input (3000)."""
        return self.n_samples // self.hop_length


@dataclass
class PrepareConfig:
    """Stage 1: which rows of a dataset become training clips, and how the output is laid out."""

    # What the input is (pipeline/layouts.py): a CommonVoice release (<split>.tsv + clips/), Hugging Face
    # Parquet (an audio column of {bytes, path}), or JSONL manifests (NeMo's audio_filepath/text); auto: by
    # what the input holds.
    layout: Layout = "auto"
    # Column (Parquet) or key (JSONL) names; None: the layout's usual ones (audio / audio_filepath; the first
    # of sentence, text, transcription... / text). Without an id column, ids derive from the audio's path
    # (JSONL) or file and row (Parquet).
    audio_column: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train", "dev", "test"])
    min_up_votes: int = 0
    max_down_votes: int | None = None
    # Clips longer than one Whisper window are rejected, not truncated: a cut clip no longer
    # matches its transcript, and the transcript is what the teacher answers.
    max_duration_s: float = 30.0
    min_duration_s: float = 0.1
    # Peak amplitude below which a clip counts as silent (1e-3 is -60 dBFS).
    silence_peak: float = 1e-3
    rows_per_file: int = 1000
    # Clips per Ray Data batch; each batch is decoded by one task on one CPU.
    batch_size: int = 16
    # At most this many clips per featurize task (its input and output blocks): what bounds a decoding worker's
    # memory, whatever the corpus size (benchmarks/bench_load.py). Fewer, on a small corpus, to spread it over
    # the CPUs.
    rows_per_task: int = 256
    # Process only the first N selected rows (smoke runs); None for all.
    limit: int | None = None


@dataclass
class TeacherConfig:
    """Stage 2: the frozen LLM whose answers to transcripts are the distillation targets."""

    # HF hub id or local directory; "tiny" builds a random Llama-3-shaped model in code (tests, demo).
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    revision: str | None = None
    # Tokenizer dir or id; defaults to `model`. Required for "tiny".
    tokenizer: str | None = None
    tiny_seed: int = 0
    # Optional system turn in the template (the paper trains without one).
    system_prompt: str | None = None
    device: Device = "cuda"
    dtype: Dtype = "bfloat16"  # compute dtype
    target_dtype: StoreDtype = "bfloat16"  # stored h_teacher
    # Transcripts longer than this (in tokens, without the template) are rejected.
    max_transcript_tokens: int = 448
    max_tokens_per_batch: int = 16384
    max_batch_size: int = 64
    padding_side: Literal["left", "right"] = "right"
    # Also cache the top-k next-token ids and log-probs (for an optional KL term); 0 = off.
    top_k: int = 0
    # Beyond the paper: also generate the LLM's greedy response (up to K tokens, to its end of turn) and
    # cache the final-norm state at each position that predicts a response token (train.distill_positions).
    # 0 = the paper's single target.
    response_tokens: int = 0
    # Rows handed to one actor call; bucketing happens within it, so more rows pack better.
    rows_per_call: int = 512
    num_actors: int = 1
    # CPUs Ray reserves per actor; on teacher.device=cpu they are also the actor's torch threads.
    cpus_per_actor: float = 1.0
    rows_per_file: int = 4096


@dataclass
class ModelConfig:
    """The student: Whisper encoder (frozen) -> Q-Former (Whisper decoder copy) -> projection -> LLM.

    The frozen LLM and its template are the teacher's (`teacher.model`, `teacher.tokenizer`, ...),
    so student and cached targets always agree.
    """

    # HF id or local dir of a Whisper checkpoint, or "tiny" (random, built in code).
    whisper: str = "openai/whisper-large-v3"
    whisper_revision: str | None = None
    tiny_whisper_seed: int = 0
    # Learned query vectors fed to the Q-Former; Whisper's decoder has 448 positions.
    num_queries: int = 448
    query_init_std: float = 0.02
    # "default" (nn.Linear init) or "mean_embedding": bias = the LLM's mean token embedding, so the
    # virtual tokens start where text tokens live (the reference model's later version).
    projection_init: Literal["default", "mean_embedding"] = "default"
    # How the Q-Former's outputs become the LLM's input vectors. "linear": the paper's learned d -> H map.
    # "vocabulary" (beyond the paper, for small runs: docs/small.md): each query's state is scored against every
    # LLM token through Whisper's own (tied) output head, reading an LLM token as Whisper's embedding of its text,
    # and the virtual token is the softmax-weighted mix of the LLM's input embeddings. The copied decoder starts
    # as the transcriber it was; the alignment term becomes the cross-entropy of those scores against the
    # transcript's tokens (train.align_side; the slots the transcript does not fill, against the " " token).
    # Needs a Whisper checkpoint with its tokenizer; nothing extra trains or is saved.
    projection: Literal["linear", "vocabulary"] = "linear"
    vocabulary_temperature: float = 1.0  # the softmax's temperature ("vocabulary" only)
    # The temperature the exported model answers with (None: vocabulary_temperature, the training one). A sharper
    # mix at inference than in training put the small student's slots nearer its transcript's tokens: word-F1
    # 0.326 -> 0.383 on the long run's 64 question clips at 0.5 (docs/small.md, "What it would take").
    answer_temperature: float | None = None
    # Which parts train.
    trainable: list[TrainablePart] = field(default_factory=lambda: ["queries", "qformer", "projection"])


@dataclass
class XlaConfig:
    """`train.device=xla`: torch_xla SPMD, one process per TPU host (pipeline/xla.py)."""

    # PJRT device: TPU on TPU VMs; CPU (with cpu_num_devices virtual devices) for tests.
    pjrt_device: Literal["TPU", "CPU"] = "TPU"
    cpu_num_devices: int | None = None
    # Data-parallel replicas inside a slice; the slice's other devices form the fsdp axis. Across
    # slices the data axis also spans the slices (DCN), so FSDP traffic stays on ICI.
    data: int = 1
    # Persistent XLA compilation cache on each host's local disk ("" disables it).
    compilation_cache: str = "~/.cache/diva/xla"
    # The TPU slice to reserve (Ray's ScalingConfig): e.g. topology 2x2x4 with accelerator_type TPU-V4;
    # train.num_workers is the number of hosts over all slices. chips_per_host is only needed when
    # no topology is given (one single-host slice). A cluster may name its slice in the driver's
    # environment instead (DIVA_XLA_TOPOLOGY, ...: see pipeline/xla.py).
    topology: str | None = None
    accelerator_type: str | None = None
    chips_per_host: int | None = None
    timeout_s: int = 1800


@dataclass
class MlflowConfig:
    """`mlflow` in train.loggers (pipeline/tracking.py): where rank 0 records the run."""

    # http(s)://host:5000, databricks, sqlite:////abs/path.db, ...; None: the driver's $MLFLOW_TRACKING_URI,
    # else a SQLite store at <output>/logs/mlflow.db (a local --output only).
    tracking_uri: str | None = None
    experiment: str = "diva"  # created when missing
    run_name: str | None = None  # None: the --output directory's name


@dataclass
class WandbConfig:
    """`wandb` in train.loggers (pipeline/tracking.py): the Weights & Biases run rank 0 logs to."""

    project: str = "diva"
    entity: str | None = None  # None: the API key's default entity
    group: str | None = None
    run_name: str | None = None  # None: the --output directory's name
    # online needs WANDB_API_KEY on the training workers; offline writes <output>/logs/wandb/ (`wandb sync` later).
    mode: Literal["online", "offline"] = "online"


@dataclass
class TrainConfig:
    """Stage 3: the optimisation (the paper's: AdamW 5e-5, wd 0.1, 1% warmup, cosine to 0, batch 512)."""

    device: Device = "cpu"
    num_workers: int = 1
    # CPUs Ray reserves per worker (torch threads: the node's CPUs / workers). Leave some to Ray Data's ingest:
    # on a 2-CPU machine, 2 workers x 1 CPU would starve the reads and the join.
    cpus_per_worker: float = 1.0
    # Examples per optimizer step over all workers; micro-batches accumulate to it, so the
    # trajectory does not depend on the worker count.
    global_batch_size: int = 512
    micro_batch_size: int = 8
    steps: int = 4300
    lr: float = 5e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_frac: float = 0.01
    grad_clip: float = 1.0
    w_distill: float = 1.0
    w_align: float = 1.0
    # Beyond the paper: a KL term on the teacher's cached top-k next-token log-probs (needs a cache made
    # with teacher.top_k > 0). 0 = off, as in the paper.
    w_kl: float = 0.0
    # Beyond the paper: distil the states that predict the teacher's first P response tokens, not only the
    # first (the student reads the teacher's response[:P-1] after its virtual tokens; needs a cache made with
    # teacher.response_tokens >= P). Position j weighs position_decay**(j-1) in each example's weighted mean
    # over the positions its response has. 1 = the paper.
    distill_positions: int = 1
    position_decay: float = 1.0
    # "sum" over a transcript's tokens (paper Eq. 1) or "token_mean" (the released code's scaling).
    align_reduction: Literal["sum", "token_mean"] = "sum"
    # Which virtual tokens the transcript aligns with: "right", the last N (paper section 3.2.1); "left", the
    # first N (beyond the paper: learns the words several times faster on a small budget, docs/small.md).
    align_side: Literal["right", "left"] = "right"
    dtype: Literal["float32", "bfloat16"] = "float32"  # FSDP2/XLA compute dtype; weights stay float32 (plain: float32)
    activation_checkpointing: bool = False
    # FSDP2 (`fully_shard`): null = on for cuda (any worker count; it also carries bf16 compute), off
    # for cpu; true on cpu runs the same sharded path over gloo (tests, big-memory CPU nodes).
    fsdp: bool | None = None
    split: str = "train"
    # A split up to this size on disk (mels + targets) is read, joined and shuffled once and kept in
    # Ray's object store; a larger one streams from storage again each epoch.
    materialize_max_mb: float = 1024.0
    shuffle: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 0
    # Stop (after a checkpoint) at this step without changing the schedule; resubmit to go on.
    stop_at_step: int | None = None
    # Beyond the paper, for small runs: the first N steps train the alignment loss alone (no LLM pass,
    # several times more examples per second), then both losses as configured. 0 = the paper's training.
    align_only_steps: int = 0
    # Keep each clip's frozen-encoder output in the worker's memory after its first epoch instead of
    # recomputing it (plain backends only; up to encoder_cache_mb). Changes no value, only the cost.
    cache_encoder: bool = False
    encoder_cache_mb: float = 4096.0
    xla: XlaConfig = field(default_factory=XlaConfig)
    # Where rank 0 logs each logged step (pipeline/tracking.py): jsonl (<output>/logs/metrics.jsonl, which jobs.plot
    # and the report read: always on), tensorboard (<output>/logs), and the optional extras mlflow and wandb
    # (pip install 'diva-ray[mlflow]' / 'diva-ray[wandb]'; settings under train.mlflow.* and train.wandb.*).
    loggers: list[Logger] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        counts = ("num_workers", "global_batch_size", "micro_batch_size", "steps", "log_every", "checkpoint_every",
                  "keep_checkpoints")
        if bad := [f"train.{k}={getattr(self, k)}" for k in counts if getattr(self, k) < 1]:
            raise ConfigError(f"{', '.join(bad)}: must be >= 1")
        if "jsonl" not in self.loggers:
            raise ConfigError(f"train.loggers={self.loggers} must include 'jsonl': jobs.plot and the training report "
                              "read <output>/logs/metrics.jsonl")
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers={self.loggers} names a logger twice")


@dataclass
class CorpusConfig:
    """The release a local run (`python -m jobs.local`) trains on, and the spoken corpus `jobs.corpus` makes."""

    # "spoken": generate one (pipeline/speech_corpus.py) under the run's output; else a CommonVoice release.
    release: str = "spoken"
    clips: int = 2500  # train + dev + test clips
    questions: int | None = None  # held-out spoken questions (each in two voices); None: all of them
    seed: int = 17
    workers: int | None = None  # rendering processes; None: every core


@dataclass
class EvalConfig:
    """Inference (evaluate, ask): how the exported model runs; the model directory fixes the model itself."""

    device: Literal["cpu", "cuda"] = "cpu"  # cuda: one GPU per actor
    dtype: Dtype = "float32"  # the frozen encoder and LLM
    split: str = "dev"
    batch_size: int = 8  # distillation examples per forward pass
    task_batch_size: int = 16  # rows per actor call: spoken questions answered as one batch (manifest rows one by one)
    num_actors: int = 1
    cpus_per_actor: float = 1.0  # on eval.device=cpu also each actor's torch threads
    max_new_tokens: int = 64
    # Classification: a label's score is the sum (its log-probability) or the mean of its token log-probs.
    label_score: Literal["sum", "mean"] = "sum"
    skip_bad_rows: bool = False  # evaluate the good rows of a manifest with bad ones (listed in the summary)
    # Also answer the split's clips and score the answers against the LLM's answers to the typed transcripts,
    # beside the cascade (Whisper transcribes, the LLM answers): pipeline/qa.py. Up to max_questions clips.
    answers: bool = False
    max_questions: int | None = None
    # JSONL task manifests a local run (jobs.local) evaluates; jobs.evaluate takes --tasks.
    tasks: list[str] = field(default_factory=list)
    # Override the base checkpoints the model directory names (e.g. a local copy).
    whisper: str | None = None
    llm: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "task_batch_size", "num_actors", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, not {getattr(self, name)}")


@dataclass
class ClusterConfig:
    """What the stages do when they ask the Ray cluster for resources, and when a process of theirs dies
    (pipeline/resources.py). -1 retries or restarts without end."""

    # A request no set of the current nodes can hold fails at once; on an autoscaling cluster (`ray up`, or
    # DIVA_AUTOSCALING=1) it waits this long for nodes to appear first.
    autoscaler_timeout_s: float = 900.0
    # A Ray Data task whose worker process dies (the OOM killer, a lost node) runs again up to this many times;
    # Ray Data's own default is forever, which turns a clip that kills every worker into a job that never ends.
    task_retries: int = 3
    # An actor-pool actor (a teacher model copy) whose process dies is restarted up to this many times, and the
    # batches it held run again on it.
    actor_restarts: int = 3


@dataclass
class ServeConfig:
    """`python -m jobs.serve`: the Ray Serve endpoint (pipeline/serve.py). The model runs as eval.device/eval.dtype
    say; eval.whisper/eval.llm override the base checkpoints its directory names."""

    host: str = "127.0.0.1"  # localhost unless deliberately opened (0.0.0.0)
    port: int = 8000
    num_replicas: int = 1
    cpus_per_replica: float = 1.0  # on eval.device=cpu also each replica's torch threads; cuda adds one GPU
    # Requests one replica works on at once (their generations interleave); more wait in Serve's queue.
    max_ongoing_requests: int = 8
    max_body_bytes: int = 16 * 2**20  # a 30 s 48 kHz stereo float WAV, base64-encoded, is ~15 MiB
    # The name clients put in `model`; None: the model directory's name.
    model_name: str | None = None
    max_tokens: int = 256  # when a request gives no max_tokens / max_completion_tokens
    # Run the encoder and Q-Former of concurrent requests as one batch (Serve's @serve.batch).
    batching: bool = False
    batch_size: int = 8
    batch_wait_s: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_ongoing_requests", "max_body_bytes", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, not {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, not {self.port}")
        if self.batch_wait_s < 0 or self.cpus_per_replica <= 0:
            raise ConfigError("serve.batch_wait_s must be >= 0 and serve.cpus_per_replica > 0")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("serve.model_name must not be empty (leave it unset for the model directory's name)")


@dataclass
class Config:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.train.w_kl > 0 and self.teacher.top_k <= 0:
            raise ConfigError(f"train.w_kl={self.train.w_kl} needs the teacher's top-k log-probs: set teacher.top_k "
                              "> 0 (and cache the targets with it)")
        self._check_positions()
        if self.model.projection == "vocabulary" and self.model.whisper == "tiny":
            raise ConfigError("model.projection=vocabulary reads the LLM's tokens through Whisper's tokenizer: the "
                              "random model.whisper=tiny has none (name a Whisper checkpoint)")
        for key in ("vocabulary_temperature", "answer_temperature"):
            value = getattr(self.model, key)
            if value is not None and not value > 0:
                raise ConfigError(f"model.{key} must be > 0, not {value}")
        if min(self.prepare.batch_size, self.prepare.rows_per_task, self.prepare.rows_per_file) < 1:
            raise ConfigError("prepare.batch_size, prepare.rows_per_task and prepare.rows_per_file must be >= 1")
        if self.prepare.max_duration_s > self.features.chunk_length_s:
            raise ConfigError(f"prepare.max_duration_s={self.prepare.max_duration_s} exceeds the encoder window "
                              f"features.chunk_length_s={self.features.chunk_length_s}: longer clips would be cut")
        sharded = self.train.fsdp if self.train.fsdp is not None else self.train.device == "cuda"
        if self.train.dtype != "float32" and self.train.device != "xla" and not sharded:
            raise ConfigError(f"train.dtype={self.train.dtype} is the FSDP2 backend's mixed precision (train.fsdp, on "
                              "by default on cuda) and XLA's; the plain backend (train.fsdp=false, or on cpu) "
                              "computes in float32: set train.dtype=float32, or train.fsdp=true")
        if self.train.cache_encoder and (self.train.device == "xla" or sharded):
            raise ConfigError("train.cache_encoder needs the plain backend (train.device cpu, or cuda with "
                              "train.fsdp=false): a sharded encoder runs collectively on every worker")

    def _check_positions(self) -> None:
        k, p, decay = self.teacher.response_tokens, self.train.distill_positions, self.train.position_decay
        if k < 0:
            raise ConfigError(f"teacher.response_tokens must be >= 0, not {k}")
        if p < 1:
            raise ConfigError(f"train.distill_positions must be >= 1 (1 = the paper), not {p}")
        if p > 1 and k < p:
            raise ConfigError(f"train.distill_positions={p} needs the teacher's states at {p} response positions: "
                              f"set teacher.response_tokens >= {p} (and cache the targets with it), not {k}")
        if not decay > 0:
            raise ConfigError(f"train.position_decay must be > 0, not {decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Build a Config from a preset name or YAML path (or defaults), then apply `key=value` overrides
    (values parsed as YAML), then `values` ({dotted key: value}, already typed: a job's flags)."""
    data = _read_yaml(source) if source else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(data, key.strip(), _parse_yaml(raw, f"override {item!r}") if raw.strip() else None)
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    return from_dict(Config, data)


def _read_yaml(source: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset or YAML file as a mapping; `extends: <preset or file>` lays it over another one."""
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {source!r} is neither a preset ({', '.join(presets())}) nor a file")
    loaded = _parse_yaml(path.read_bytes(), str(path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: `extends` names a preset or a YAML file, not {base!r}")
    if str(path.resolve()) in seen:
        raise ConfigError(f"{path}: `extends` goes round in a circle ({' -> '.join(seen)})")
    try:
        parent = _read_yaml(base, (*seen, str(path.resolve())))
    except ConfigError as e:
        raise ConfigError(f"{path}: extends: {e}") from None
    return _merged(parent, loaded)


def _parse_yaml(text: str | bytes, where: str) -> Any:
    """YAML text -> data; any failure is a ConfigError naming `where`. Besides YAMLError, PyYAML raises
    ValueError, KeyError or AttributeError for a bad explicit tag (`!!int x`, `!!bool maybe`)."""
    try:
        return yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"{where}: not valid YAML ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    if not all(part.strip() for part in (*parents, leaf)):
        raise ConfigError(f"override {key!r}: empty name in a dotted key (expected section.key=value)")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass `cls` from a (partial) mapping, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)  # YAML keys may be numbers, booleans or null
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(where + k) for k in unknown)}; valid: {', '.join(sorted(names))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value
