"""The access log's handler (service.api.server.BackgroundStreamHandler): lines formatted and written off the
thread that logs them (the event loop), in order, each with the request id of the context it was logged in."""

from __future__ import annotations

import io
import logging
import pydoc
import threading
import time

from asgi_correlation_id import CorrelationIdFilter
from asgi_correlation_id.context import correlation_id

from service.api.server import BackgroundStreamHandler, log_config


def test_access_lines_are_written_off_the_logging_thread_in_order_with_their_request_id():
    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream)
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    formatted_in: list[int] = []

    class Recording(logging.Formatter):
        def format(self, record):
            formatted_in.append(threading.get_ident())
            return super().format(record)

    handler.setFormatter(Recording("[%(correlation_id)s] %(message)s"))
    logger = logging.getLogger("tests.api.access")
    logger.propagate, level = False, logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        token = correlation_id.set("rid-1")
        for i in range(50):
            logger.info("line %d", i)
        correlation_id.reset(token)
        logger.info("outside a request")
        deadline = time.monotonic() + 10
        while stream.getvalue().count("\n") < 51 and time.monotonic() < deadline:  # the writing thread's batch
            time.sleep(0.01)
        assert len(formatted_in) == 51 and threading.get_ident() not in formatted_in
        logger.info("just before close")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()  # writes what is still queued
    assert stream.getvalue().splitlines() == ([f"[rid-1] line {i}" for i in range(50)]
                                              + ["[-] outside a request", "[-] just before close"])
    handler.close()  # a second close (logging's shutdown at exit) changes nothing
    assert stream.getvalue().count("\n") == 52


def test_the_server_log_configuration_uses_it_for_access_lines():
    access = log_config("INFO")["handlers"]["access"]
    assert pydoc.locate(access["()"]) is BackgroundStreamHandler
    assert access["filters"] == ["request_id"] and access["stream"] == "ext://sys.stdout"
