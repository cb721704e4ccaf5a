"""benchmarks/fanout.py end to end on the tiny backbone: the server it starts answers fan-out and separate calls,
and the report gives each figure and its ratio to the fan-out call."""

from __future__ import annotations

import json

from benchmarks import fanout


def test_fanout_benchmark_runs_and_reports_ratios(tiny_backbone_dir, tmp_path, capsys):
    assert fanout.main(["--tasks", "3", "--rounds", "2", "--threads", "1", "--precision", "fp32",
                        "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "fanout_cpu.json").read_text())
    assert res["config"]["tasks"] == 3 and res["config"]["precision"] == "fp32"
    for name in ("fanout", "separate_sequential", "separate_concurrent"):
        f = res["figures"][name]
        assert f["rounds"] == 2 and 0 < f["p50_ms"] <= f["p90_ms"]
    md = (tmp_path / "fanout_cpu.md").read_text()
    assert "| one fan-out call (one mixed-task pass) |" in md and "1.00x" in md
    assert "3 predict calls, sequential" in md and md in capsys.readouterr().out
