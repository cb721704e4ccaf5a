"""The fleet's metrics: each model replica publishes its ``/metrics`` text to one detached hub actor
(:func:`metrics_hub`); the ingress collects them and merges them into one exposition (:func:`merge_metrics`),
each series labelled with its replica."""

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.fleet import APP_NAME

METRICS_HUB_NAME = "supermask-metrics-hub"
"""The hub actor's name (in the :data:`~service.fleet.APP_NAME` namespace)."""


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Merge Prometheus text expositions of several replicas into one, adding ``replica="<id>"`` to every
    sample (families of the same name are merged, so HELP/TYPE appear once).

    Args:
        texts: replica id -> that replica's ``/metrics`` text.
    Returns:
        The merged exposition (Prometheus text format 0.0.4, as ``prometheus_client.generate_latest``).
    """
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                                  for s in fam.samples)

    class _Collected:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry)


def metrics_hub():
    """The fleet's metrics hub actor (a Ray actor handle): created by whichever replica asks first, detached (it
    outlives the replica that created it: killing that one must not lose the others' metrics), 0 CPUs."""
    import ray

    @ray.remote(num_cpus=0)
    class MetricsHub:
        """Latest ``/metrics`` text of each model replica, with the time it arrived."""

        def __init__(self):
            self.texts: dict[str, tuple[float, str]] = {}

        def publish(self, replica: str, text: str) -> None:
            self.texts[replica] = (time.time(), text)

        def collect(self, max_age_s: float) -> dict[str, str]:
            now = time.time()
            self.texts = {r: v for r, v in self.texts.items() if now - v[0] <= max_age_s}
            return {r: t for r, (_, t) in self.texts.items()}

    return MetricsHub.options(name=METRICS_HUB_NAME, namespace=APP_NAME, get_if_exists=True,
                              lifetime="detached").remote()
