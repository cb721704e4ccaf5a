"""benchmarks/many_tasks.py: its pieces (Zipf plan, cap split, renamed copies, masked ONNX copies) and a --smoke run
end to end on the tiny backbone, this server against the ONNX Runtime LRU peer (figures checked for shape and
sanity, never for values)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import many_tasks, synthetic
from benchmarks.peers import onnx_export

MiB = 2**20


def test_quick_and_smoke_shrink_the_defaults_and_explicit_options_win():
    full = many_tasks.parse_args([])
    assert (full.tasks_list, full.requests, full.clients, full.memory_gib) == ([100, 1000, 10000], 2000, 8, 2.0)
    assert full.out.endswith("many_tasks")
    quick = many_tasks.parse_args(["--quick", "--requests", "7"])
    assert (quick.tasks_list, quick.requests) == ([100, 1000], 7) and quick.out.endswith("many_tasks_quick")
    for bad in (["--sparsity-range", "0.05,0.01"], ["--memory-gib", "0"], ["--quick", "--smoke"],
                ["--server-env", "CACHE=1"], ["--peers", "vllm"]):
        with pytest.raises(SystemExit):
            many_tasks.parse_args(bad)


def test_zipf_plan_is_seeded_and_favours_its_first_ranks():
    a = many_tasks.zipf_plan(50, 5000, np.random.default_rng(1))
    assert np.array_equal(a, many_tasks.zipf_plan(50, 5000, np.random.default_rng(1)))
    assert a.min() >= 0 and a.max() < 50
    counts = np.sort(np.bincount(a, minlength=50))[::-1]
    # P(rank 1) = 1 / H(50) = 0.222 and P(rank 2) half of it: far from uniform (0.02 each)
    assert 0.18 < counts[0] / a.size < 0.27 and 0.35 < counts[1] / counts[0] < 0.65


def test_split_cap_fills_the_cap_and_keeps_two_tasks_per_tier_when_it_cannot():
    cal = {"base_rss_mib": 500.0, "warm_bytes_per_task": 300_000.0, "hot_bytes_per_task": 25 * MiB}
    cap = 2 * 2**30
    few = many_tasks.split_cap(cap, cal, 100, 0.5, 0.25)
    assert few["fits"] and few["cache_bytes"] == int(1.05 * 100 * 300_000)  # every warm task, the rest sparse / hot
    rest = few["available_bytes"] - few["cache_bytes"]
    assert few["sparse_cache_bytes"] == pytest.approx(0.25 * rest, abs=1)
    assert few["cache_bytes"] + few["hot_cache_bytes"] + few["sparse_cache_bytes"] == pytest.approx(
        few["available_bytes"], abs=2)
    assert few["available_bytes"] == int(cap - 500 * MiB - many_tasks.HEADROOM * cap)
    many = many_tasks.split_cap(cap, cal, 10_000, 0.5)
    assert many["cache_bytes"] == int(0.5 * many["available_bytes"]) and many["warm_tasks_fit"] < 10_000
    tiny = many_tasks.split_cap(400 * MiB, cal, 10, 0.5)  # below the base RSS
    assert not tiny["fits"] and tiny["hot_tasks_fit"] == 2 and tiny["warm_tasks_fit"] == 2


def test_renamed_copy_keeps_the_payload_and_names_the_new_task(tiny_backbone):
    from mask_store.errors import BundleInvalid
    from mask_store.format import decode_bundle

    masks, head = synthetic.random_task(tiny_backbone, np.random.default_rng(0), 0.03)
    data = synthetic.task_bundle(tiny_backbone, "orig", masks, head)
    copy = synthetic.renamed_copy(data, "task-00007")
    a, b = decode_bundle(data), decode_bundle(copy)  # full validation: header digest, section digests
    assert b.header.task == "task-00007" and a.header.task == "orig"
    assert b.masks == a.masks and all(np.array_equal(b.head[k], a.head[k]) for k in a.head)
    assert b.header.model_dump(exclude={"task"}) == a.header.model_dump(exclude={"task"})
    with pytest.raises(BundleInvalid):
        synthetic.renamed_copy(data, "not a name!")


def test_masked_onnx_copies_prune_exactly_the_masked_weights(tiny_backbone, tiny_backbone_dir, tmp_path):
    if onnx_export.missing():
        pytest.skip(onnx_export.missing())
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    template = onnx_export.export_int8(tiny_backbone_dir, tmp_path)
    models = onnx_export.MaskedModels(template)
    assert sorted(models.weights) == sorted(f"{p}.weight" for p in tiny_backbone.masked)
    masks, _ = synthetic.random_task(tiny_backbone, np.random.default_rng(3), 0.3)
    models.write(masks, tmp_path / "t.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "t.onnx")).graph.initializer}
    for name, (init, w, zp) in models.weights.items():
        got, keep = inits[init.name], masks[name].T
        assert np.array_equal(got[keep], w[keep])  # kept weights untouched
        assert np.array_equal(got[~keep], np.broadcast_to(zp, w.shape)[~keep])  # pruned ones are the quantized 0
    enc = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64),
           "token_type_ids": np.zeros((1, 3), np.int64)}
    out = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(None, enc)[0]
    assert out.shape == (1, 3, tiny_backbone.hidden_size) and np.isfinite(out).all()
    with pytest.raises(KeyError):
        models.write({}, tmp_path / "none.onnx")


def test_smoke_run_end_to_end_on_the_tiny_backbone(tiny_backbone_dir, tmp_path):
    out = tmp_path / "many"
    rc = many_tasks.main(["--smoke", "--backbone", str(tiny_backbone_dir), "--memory-gib", "0.5",
                          "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0, res["runs"]
    n = 20
    assert res["config"]["tasks_list"] == [n] and res["bundles"]["tasks"] == n
    assert res["bundles"]["distinct_masks"] == 4 and res["bundles"]["copies"] == n - 4
    assert 0.01 <= res["bundles"]["sparsity_min"] <= res["bundles"]["sparsity_max"] <= 0.05
    with_peer = onnx_export.missing() is None
    assert [r["server"] for r in res["rows"]] == [many_tasks.OURS] + ([many_tasks.PEER] if with_peer else [])
    for r in res["rows"]:
        assert r["failures"] == 0 and r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert 0 < r["hot_p50_ms"] and 0 < r["touch_p50_ms"] <= r["touch_p99_ms"]
        assert r["rss_peak_mib"] > 100 and r["rss_after_touch_mib"] > 100
        assert 0 <= r["cold_ratio"] <= 1
        assert r["hot_ratio"] == pytest.approx(1 - r["cold_ratio"] - (r["warm_ratio"] or 0))

    ours = res["runs"][str(n)][many_tasks.OURS]
    split = res["splits"][str(n)]
    tiers = ours["healthz_end"]["tiers"]  # the server runs with the budgets the split chose
    assert tiers["warm"]["capacity_bytes"] == split["cache_bytes"]
    assert tiers["hot"]["capacity_bytes"] == split["hot_cache_bytes"]
    assert ours["healthz_end"]["tasks"] == n
    touch = ours["touch_tiers"]["delta"]
    assert touch["requests"] == n and touch["cache_misses"] >= n - 1  # every task but the hot one loaded now
    stream = ours["stream_tiers"]
    assert stream["delta"]["requests"] == res["config"]["requests"] == ours["stream"]["requests"]
    assert stream["swap_in_ms_per_request"] >= stream["promotion_ms_per_request"] >= 0
    assert res["calibration"]["ours"]["warm_bytes_per_task"] > 0 and res["calibration"]["ours"]["base_rss_mib"] > 100

    if with_peer:
        peer = res["runs"][str(n)][many_tasks.PEER]
        cal = res["calibration"]["peer"]
        assert cal["session_rss_mib"] > 0 and cal["lru"] >= 1
        assert peer["healthz_end"]["lru"] == cal["lru"] and peer["healthz_end"]["resident_tasks"] <= cal["lru"]
        assert n - 1 <= peer["stream_tiers"]["touch_session_loads"] <= n  # a session per task touched
        assert res["peer_files"]["files"] == 4 and res["peer_files"]["links"] == n
    md = out.with_suffix(".md").read_text()
    assert res["command"] in md and "| 20 | supermask |" in md and "SUPERMASK_HOT_CACHE_BYTES" in md
