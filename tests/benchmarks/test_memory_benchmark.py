"""benchmarks/memory_cpu.py on the tiny backbone: the figures it reports are the engine's own."""

from __future__ import annotations

import json

import pytest

from benchmarks import memory_cpu
from backbone import load_backbone
from tests.conftest import make_bundle

MiB = 2**20


def test_memory_benchmark_reports_resident_bytes_rss_steps_and_churn(tiny_backbone_dir, tmp_path):
    bb = load_backbone(tiny_backbone_dir)  # only to make bundles with its fingerprint
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "single.smask").write_bytes(make_bundle(bb, "single", sparsity=0.05))
    (examples / "pairs.smask").write_bytes(make_bundle(bb, "pairs", sparsity=0.3, text_pairs=True, seed=1))
    out = tmp_path / "memory"
    assert memory_cpu.main(["--backbone", str(tiny_backbone_dir), "--examples-dir", str(examples),
                            "--rounds", "2", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert sorted(res["tasks"]) == ["pairs", "single"]
    # the sum is of what the engine reported per task; more pruned weights keep more resident entries
    assert res["resident_task_bytes"] == sum(t["resident_bytes"] for t in res["tasks"].values())
    assert res["tasks"]["pairs"]["resident_bytes"] > res["tasks"]["single"]["resident_bytes"] > 0
    assert len(res["churn_rss"]) == 2 and all(x > 0 for x in res["churn_rss"])
    if res["malloc_trim"]:  # trimming only hands memory back
        assert res["rss"]["all_tasks_warm_trimmed"] <= res["rss"]["all_tasks_warm"] + MiB
    md = out.with_suffix(".md").read_text()
    assert "--examples-dir" in md and "| pairs |" in md and "Churn" in md


def test_memory_benchmark_refuses_an_empty_examples_folder(tiny_backbone_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no task bundles"):
        memory_cpu.measure(str(tiny_backbone_dir), str(tmp_path))
