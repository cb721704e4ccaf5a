"""benchmarks/synthetic.py and benchmarks/serve_cpu.py --synthetic: a random backbone of a given shape, random
tasks the server accepts for it, and the end-to-end benchmark over them (the GPU session's serving figures
come from this mode, since the real backbone's weights cannot travel to that machine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import serve_cpu, synthetic
from mask_store.format import decode_bundle
from backbone import load_backbone

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)


def test_synthetic_backbone_and_tasks_fit_each_other(tiny_shape, tiny_backbone_dir, tmp_path):
    folder = synthetic.write_backbone("tiny", tmp_path / "bb", tokenizer_dir=tiny_backbone_dir)
    bb = load_backbone(folder)
    assert (bb.hidden_size, len(bb.masked)) == (32, 2 * 6)
    names = synthetic.write_tasks(folder, tmp_path / "tasks", 3, sparsity=0.25, seed=1)
    assert names == ["synthetic-00", "synthetic-01", "synthetic-02"]
    for i, name in enumerate(names):
        bundle = decode_bundle((tmp_path / "tasks" / f"{name}.smask").read_bytes())
        h = bundle.header
        assert h.task == name and h.backbone_fingerprint == bb.fingerprint and h.text_pairs == bool(i % 2)
        kept = np.concatenate([bundle.mask_array(p).ravel() for p in bundle.masks])
        assert kept.size == sum(bb.qweight[n].numel() for n in bb.masked)
        assert abs(1 - kept.mean() - 0.25) < 0.01  # sparsity: the fraction of zeros asked for
    with pytest.raises(ValueError):
        synthetic.write_tasks(folder, tmp_path / "none", 0)


def test_serve_benchmark_synthetic_mode_end_to_end(tiny_shape, tiny_backbone_dir, tmp_path):
    out = tmp_path / "serve"
    rc = serve_cpu.main(["--synthetic", "tiny", "--synthetic-tasks", "3", "--tokenizer-dir", str(tiny_backbone_dir),
                         "--data-dir", str(tmp_path / "no-glue"), "--requests", "3", "--mixed-requests", "9",
                         "--concurrency", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["synthetic"] == {"model": "tiny", "tasks": 3, "sparsity": 0.05}
    assert sorted(res["tasks"]) == ["synthetic-00", "synthetic-01", "synthetic-02"]
    assert all(t["rest_dev"] == {} and t["resident_bytes"] > 0 for t in res["tasks"].values())
    assert res["latency_task"] == "synthetic-00" and [r["batch"] for r in res["latency"]] == [1, 32]
    for kind in ("batched", "unbatched"):
        ml = res["mixed_load"][kind]
        assert ml["requests"] == 9 and ml["tasks"] == 3 and ml["throughput_rps"] > 0
    assert res["gpu_allocated_all_tasks_bytes"] == 0  # CPU server: the gauge is exported and reads 0
    md = out.with_suffix(".md").read_text()
    assert "random-weight tiny backbone, 3 random-mask tasks" in md and "| synthetic-02 |" in md
