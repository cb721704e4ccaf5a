"""The request path does no thread hop it does not pay back: FastAPI runs a plain ``def`` dependency in its thread
pool (a hop per request, ~0.2-0.3 ms on a 2-core host), so every dependency of every route is a coroutine."""

from __future__ import annotations

import importlib
import inspect

import pytest


def _calls(dependant):
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


@pytest.mark.parametrize("module", ["routes", "fanout", "v2", "tei"])
def test_no_dependency_of_a_route_runs_in_the_thread_pool(module):
    router = importlib.import_module(f"service.api.{module}").router
    seen = 0
    for route in router.routes:
        for call in _calls(route.dependant):
            seen += 1
            coroutine = inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)
            assert coroutine, f"{route.path}: dependency {call!r} is a plain function (run in the thread pool)"
    assert seen > 0  # every router takes the app state through a dependency
