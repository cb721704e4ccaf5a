"""Optional OpenTelemetry tracing: off by default (``SUPERMASK_OTEL_TRACING=true`` turns it on).

When on, ``opentelemetry-instrumentation-fastapi`` makes a server span per request (:func:`instrument`), and
the engine adds its stages as child spans:

``supermask.prepare``  input check, task load (a cold task) and hot-tier promotion, per request;
``supermask.queue``    the time a request waited in the micro-batcher's queue for its pass, per request;
``supermask.batch``    one gathered forward call, in the batcher's worker thread, *linked* to the request spans
                       it serves (OTel's pattern for batching: one span, many parents);
``supermask.tokenize`` tokenization of the call's rows, under ``supermask.batch`` (or the request span);
``supermask.forward``  the masked forward pass itself (the pass lock held), likewise.

Spans go to the tracer provider the process already has (one set by ``opentelemetry-instrument``, or by a test)
or, when none is set, to a new SDK provider exporting OTLP over HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``
(the exporter's standard variables apply) or, with ``SUPERMASK_OTEL_EXPORTER=console``, to standard output.
With tracing off, every function here is a no-op and nothing of OpenTelemetry is imported.
Packages: the ``otel`` extra (``opentelemetry-sdk``, ``opentelemetry-instrumentation-fastapi``,
``opentelemetry-exporter-otlp-proto-http``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

_tracer = None  # an opentelemetry Tracer while tracing is on
_provider = None  # its TracerProvider


def enabled() -> bool:
    return _tracer is not None


def enable(exporter: str = "otlp", service_name: str = "supermask", provider: Any = None) -> None:
    """Turn tracing on for this process (idempotent: a second call changes nothing).

    Args:
        exporter: ``otlp`` (OTLP/HTTP) or ``console``; used only when no tracer provider is given or set yet.
        service_name: the ``service.name`` resource attribute of a provider made here.
        provider: the ``TracerProvider`` to use (tests); default: the process's global one, made and set
            here when there is none.
    Raises:
        RuntimeError: the OpenTelemetry packages are not installed (``pip install 'supermask[otel]'``).
    """
    global _tracer, _provider
    if _tracer is not None:
        return
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise RuntimeError("SUPERMASK_OTEL_TRACING needs the OpenTelemetry packages: "
                           "pip install 'supermask[otel]'") from exc
    if provider is None and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # none set
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter == "console":
            span_exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        log.info("OpenTelemetry tracing on: %s exporter", exporter)
    _provider = provider or trace.get_tracer_provider()
    _tracer = _provider.get_tracer("supermask")


def disable() -> None:
    """Turn tracing off again (spans of apps instrumented meanwhile still go to their provider)."""
    global _tracer, _provider
    _tracer = _provider = None


def instrument(app) -> None:
    """Server spans for every request of ``app`` (``FastAPIInstrumentor.instrument_app``), when tracing is on."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="/metrics$,/healthz$,/readyz$")


def span(name: str, **attributes: Any):
    """A child span of the current one around a block (a no-op context manager when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def current() -> Any:
    """The current trace context, to hand to another thread or a later span (None when tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def now_ns() -> int:
    return time.time_ns()


def record(name: str, parent: Any, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished span ``[start_ns, end_ns]`` (Unix ns) under ``parent`` (:func:`current`'s value)."""
    if _tracer is None or parent is None:
        return
    s = _tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes or None)
    s.end(end_time=end_ns)


def linked(name: str, parents: Iterable[Any], fn: Callable[..., Any], *args: Any, **attributes: Any) -> Any:
    """``fn(*args)`` inside a new root span linked to each of ``parents``' spans (a batch serving many
    requests); just ``fn(*args)`` when tracing is off. For a worker thread: the span is current there."""
    if _tracer is None:
        return fn(*args)
    from opentelemetry import trace

    links = []
    for ctx in parents:
        sc = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
        if sc is not None and sc.is_valid:
            links.append(trace.Link(sc))
    from opentelemetry.context import Context

    with _tracer.start_as_current_span(name, context=Context(), links=links, attributes=attributes or None):
        return fn(*args)
