"""benchmarks/request_path.py: a short run on the real backbone answers over REST and in-process with the same
settings, and reports both paths and their difference (figures checked for shape and sign, never for values)."""

from __future__ import annotations

import json

import pytest

from benchmarks import request_path


@pytest.mark.real
def test_short_run_measures_both_paths(tmp_path):
    out = tmp_path / "request_path"
    assert request_path.main(["--requests", "6", "--sentences", "8", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    for path in ("rest", "in_process", "healthz"):
        assert res[path]["requests"] == 6 and 0 < res[path]["p50_ms"] <= res[path]["p99_ms"]
    assert res["rest_minus_in_process_p50_ms"] == pytest.approx(res["rest"]["p50_ms"] - res["in_process"]["p50_ms"])
    assert res["served"]["precision"] in ("fp32", "bf16", "int8") and res["served"]["runtime"] in ("torch", "onnxruntime")
    assert "REST minus in-process" in out.with_suffix(".md").read_text()
    assert res["server_log_level"] == "INFO"  # the server's default: access lines on, as users run it
