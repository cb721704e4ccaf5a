"""Every Prometheus collector of the server, in one registry, prefix ``supermask_``.

The engine records; route handlers do not. Each server instance owns its own
:class:`Metrics` (and registry), so tests can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API layer)

PREFIX = "supermask"
LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SWAP_IN_BUCKETS_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER_TASK = "_other"
"""The ``task`` label of the tasks beyond ``Metrics.max_task_labels``."""


class Metrics:
    """Collectors (names as exported):

    ===============================================  =========  ==========================================
    name                                             type       meaning
    ===============================================  =========  ==========================================
    supermask_request_duration_seconds{task}         histogram  predict latency, engine entry to result
    supermask_requests_total{task,outcome}           counter    predict requests (outcome: ok / error)
    supermask_inference_rows{task}                   histogram  inputs per predict request
    supermask_task_load_duration_seconds{task}       histogram  swap-in: read bundle, validate, build masks
    supermask_cache_hits_total{task}                 counter    predict found the task resident
    supermask_cache_misses_total{task}               counter    predict had to load the task
    supermask_cache_evictions_total                  counter    tasks evicted to stay within the budget
    supermask_resident_tasks                         gauge      tasks in the host cache
    supermask_resident_task_bytes{task}              gauge      bytes of one resident task
    supermask_cache_bytes                            gauge      bytes of all resident tasks
    supermask_cache_capacity_bytes                   gauge      the cache's byte budget
    supermask_backbone_bytes                         gauge      bytes of the shared backbone tensors
    supermask_hot_promotion_duration_seconds{task}  histogram  warm -> hot: unpack mask bits, materialise weights
    supermask_hot_tasks                              gauge      tasks in the CPU hot tier
    supermask_hot_evictions_total                    counter    tasks evicted from the hot tier to stay within budget
    supermask_hot_admissions_total{decision}         counter    requests to a task not hot: its hot form built and kept
                                                                ("promoted"), built for the pass only ("pass_only"), or
                                                                served through its sparse form ("sparse": seen too
                                                                rarely, or no room; service/sparse_forms.py)
    supermask_hot_bytes                              gauge      bytes of the hot tier's materialised weights
    supermask_hot_capacity_bytes                     gauge      the hot tier's byte budget
    supermask_sparse_form_duration_seconds           histogram  warm -> sparse form: decode pruned positions, build CSR
    supermask_sparse_tasks                           gauge      tasks whose sparse form is held
    supermask_sparse_bytes                           gauge      bytes of the held sparse forms
    supermask_sparse_capacity_bytes                  gauge      the sparse forms' byte budget
    supermask_sparse_evictions_total                 counter    sparse forms evicted to stay within budget
    supermask_cpu_precision_info{precision}          gauge      1 for the CPU compute precision in use
    supermask_tier_info{precision,runtime}           gauge      1 for the compute tier in use (service/tiers)
    supermask_device_swap_in_duration_seconds{task}  histogram  copy a task's mask bits into a GPU slot + relayout
    supermask_device_resident_tasks                  gauge      tasks holding a GPU mask slot
    supermask_gpu_memory_allocated_bytes             gauge      torch.cuda.memory_allocated (0 without CUDA)
    supermask_gpu_memory_reserved_bytes              gauge      torch.cuda.memory_reserved (0 without CUDA)
    supermask_quarantined_bundles_total              counter    corrupt stored bundles moved aside
    supermask_overloaded_requests_total              counter    predict requests refused with 429 (queue full)
    supermask_admitted_requests                      gauge      predict requests queued or running now
    supermask_process_resident_memory_bytes          gauge      process RSS (and the other process_* series)
    ===============================================  =========  ==========================================

    Args:
        max_task_labels: most distinct values of the ``task`` label (None: unbounded). Each labelled task holds
            about 60 series (measured: 10,000 tasks held 179 MiB of series and took 6.5 s to render, a 48 MB
            scrape); past the bound, a task not yet labelled is counted under ``task="_other"`` (its own bytes
            gauge is not kept), and a deleted task frees its label. ``SUPERMASK_METRICS_MAX_TASK_LABELS``.
    """

    def __init__(self, max_task_labels: int | None = None) -> None:
        if max_task_labels is not None and max_task_labels < 0:
            raise ValueError(f"max_task_labels must be >= 0, got {max_task_labels}")
        self.max_task_labels = max_task_labels
        self._labelled: set[str] = set()
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(f"{PREFIX}_request_duration_seconds", "Predict latency in seconds.",
                                         ["task"], buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Predict requests.", ["task", "outcome"], registry=r)
        self.rows = Histogram(f"{PREFIX}_inference_rows", "Inputs per predict request.", ["task"],
                              buckets=BATCH_BUCKETS, registry=r)
        self.load_seconds = Histogram(f"{PREFIX}_task_load_duration_seconds",
                                      "Task swap-in time in seconds (read, validate, build masks and head).",
                                      ["task"], buckets=LOAD_BUCKETS_SECONDS, registry=r)
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Task cache hits.", ["task"], registry=r)
        self.cache_misses = Counter(f"{PREFIX}_cache_misses", "Task cache misses.", ["task"], registry=r)
        self.cache_evictions = Counter(f"{PREFIX}_cache_evictions", "Tasks evicted from the cache.", registry=r)
        self.resident_tasks = Gauge(f"{PREFIX}_resident_tasks", "Tasks resident in the host cache.", registry=r)
        self.resident_task_bytes = Gauge(f"{PREFIX}_resident_task_bytes", "Bytes of a resident task.", ["task"],
                                         registry=r)
        self.cache_bytes = Gauge(f"{PREFIX}_cache_bytes", "Bytes of all resident tasks.", registry=r)
        self.cache_capacity_bytes = Gauge(f"{PREFIX}_cache_capacity_bytes", "Byte budget of the task cache.",
                                          registry=r)
        self.backbone_bytes = Gauge(f"{PREFIX}_backbone_bytes", "Bytes of the shared backbone tensors.", registry=r)
        self.hot_promotion_seconds = Histogram(
            f"{PREFIX}_hot_promotion_duration_seconds",
            "CPU hot tier promotion time in seconds (unpack a warm task's mask bits, materialise its weights).",
            ["task"], buckets=SWAP_IN_BUCKETS_SECONDS, registry=r)
        self.hot_tasks = Gauge(f"{PREFIX}_hot_tasks", "Tasks in the CPU hot tier.", registry=r)
        self.hot_evictions = Counter(f"{PREFIX}_hot_evictions", "Tasks evicted from the hot tier.", registry=r)
        self.hot_admissions = Counter(f"{PREFIX}_hot_admissions", "Hot forms built, by whether they were kept hot.",
                                      ["decision"], registry=r)
        self.hot_bytes = Gauge(f"{PREFIX}_hot_bytes", "Bytes of the CPU hot tier's materialised weights.", registry=r)
        self.hot_capacity_bytes = Gauge(f"{PREFIX}_hot_capacity_bytes", "Byte budget of the CPU hot tier.",
                                        registry=r)
        self.sparse_form_seconds = Histogram(
            f"{PREFIX}_sparse_form_duration_seconds",
            "Seconds to build a task's sparse form (pruned positions -> CSR corrections).",
            buckets=SWAP_IN_BUCKETS_SECONDS, registry=r)
        self.sparse_tasks = Gauge(f"{PREFIX}_sparse_tasks", "Tasks whose sparse form is held.", registry=r)
        self.sparse_bytes = Gauge(f"{PREFIX}_sparse_bytes", "Bytes of the held sparse forms.", registry=r)
        self.sparse_capacity_bytes = Gauge(f"{PREFIX}_sparse_capacity_bytes", "Byte budget of the sparse forms.",
                                           registry=r)
        self.sparse_evictions = Counter(f"{PREFIX}_sparse_evictions", "Sparse forms evicted to stay within budget.",
                                        registry=r)
        self.cpu_precision = Gauge(f"{PREFIX}_cpu_precision_info", "1 for the CPU compute precision in use.",
                                   ["precision"], registry=r)
        self.tier = Gauge(f"{PREFIX}_tier_info", "1 for the compute tier in use: its precision and runtime.",
                          ["precision", "runtime"], registry=r)
        self.device_swap_in_seconds = Histogram(
            f"{PREFIX}_device_swap_in_duration_seconds",
            "Device tier swap-in time in seconds (host-to-device copy of the packed masks and relayout into a slot).",
            ["task"], buckets=SWAP_IN_BUCKETS_SECONDS, registry=r)
        self.device_resident_tasks = Gauge(f"{PREFIX}_device_resident_tasks", "Tasks holding a GPU mask slot.",
                                           registry=r)
        # Read at scrape time, so they never go stale; 0 while CUDA is absent or not initialised.
        self.gpu_memory_allocated_bytes = Gauge(f"{PREFIX}_gpu_memory_allocated_bytes",
                                                "GPU memory held by tensors (torch.cuda.memory_allocated).",
                                                registry=r)
        self.gpu_memory_allocated_bytes.set_function(_gpu_memory_allocated_bytes)
        self.gpu_memory_reserved_bytes = Gauge(f"{PREFIX}_gpu_memory_reserved_bytes",
                                               "GPU memory reserved by torch's caching allocator "
                                               "(torch.cuda.memory_reserved).", registry=r)
        self.gpu_memory_reserved_bytes.set_function(_gpu_memory_reserved_bytes)
        self.overloaded = Counter(f"{PREFIX}_overloaded_requests", "Predict requests refused with 429.", registry=r)
        self.admitted = Gauge(f"{PREFIX}_admitted_requests", "Predict requests queued or running now.", registry=r)
        self.quarantined = Counter(f"{PREFIX}_quarantined_bundles", "Corrupt stored bundles moved aside.", registry=r)
        ProcessCollector(namespace=PREFIX, registry=r)

    def task(self, task: str) -> str:
        """The ``task`` label value to record ``task`` under: its own name, or :data:`OTHER_TASK` once
        ``max_task_labels`` other tasks hold labels."""
        if task in self._labelled or self.max_task_labels is None:
            return task
        if len(self._labelled) < self.max_task_labels:
            self._labelled.add(task)
            return task
        return OTHER_TASK

    def set_task_bytes(self, task: str, nbytes: int) -> None:
        """``supermask_resident_task_bytes{task}`` (not kept for a task beyond ``max_task_labels``)."""
        label = self.task(task)
        if label != OTHER_TASK:
            self.resident_task_bytes.labels(label).set(nbytes)

    def drop_task_bytes(self, task: str) -> None:
        """Remove ``task``'s ``supermask_resident_task_bytes`` series (evicted; no-op when it has none)."""
        try:
            self.resident_task_bytes.remove(task)
        except KeyError:
            pass

    def forget(self, task: str) -> None:
        """Remove every series labelled with ``task`` (a deleted task), so that the label set stays the
        tasks that exist however many are uploaded and deleted over time."""
        for c in (self.request_seconds, self.rows, self.load_seconds, self.cache_hits, self.cache_misses,
                  self.resident_task_bytes, self.hot_promotion_seconds, self.device_swap_in_seconds):
            try:
                c.remove(task)
            except KeyError:
                pass
        for outcome in ("ok", "error"):
            try:
                self.requests.remove(task, outcome)
            except KeyError:
                pass
        self._labelled.discard(task)

    def render(self) -> bytes:
        """Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


def _gpu_memory_allocated_bytes() -> float:
    import torch  # imported at scrape time: this module itself needs no torch

    return float(torch.cuda.memory_allocated()) if torch.cuda.is_initialized() else 0.0


def _gpu_memory_reserved_bytes() -> float:
    import torch

    return float(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else 0.0
