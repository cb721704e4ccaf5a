"""benchmarks/cpu_peers.py: the peer app and ONNX export on the tiny backbone, the ratio logic, and a --smoke
run of this server (fp32) against the hf-fp32 peer on the real backbone (figures checked for shape and sign,
never for values)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import cpu_peers
from benchmarks.peers import app as peer_app
from benchmarks.peers import onnx_export
from benchmarks.peers.procs import tree_pids, tree_rss_bytes


def test_smoke_shrinks_the_defaults_and_explicit_options_win():
    full = cpu_peers.parse_args([])
    assert (full.rounds, full.tasks_list, full.precisions, full.peers) == (
        3, [1, 6, 20, 100], ["fp32", "bf16", "int8", "auto"],
        ["hf-fp32", "hf-int8", "ort-int8", "ort-int8-concurrent", "ov"])
    smoke = cpu_peers.parse_args(["--smoke", "--requests", "7", "--tasks-list", "4,1,4"])
    assert (smoke.rounds, smoke.requests, smoke.tasks_list) == (1, 7, [1, 4])
    assert smoke.out.endswith("cpu_peers_smoke")
    for bad in (["--peers", "vllm"], ["--precisions", "fp16"], ["--tasks-list", "0,3"], ["--precisions", "",
                                                                                      "--peers", ""]):
        with pytest.raises(SystemExit):
            cpu_peers.parse_args(bad)


def _server(ours: bool, figures: list[dict]) -> dict:
    return {"ours": ours, "rounds": [{"figures": f} for f in figures]}


def test_medians_best_peer_and_ratios():
    specs = cpu_peers.figure_specs([1])
    keys = [k for k, _, _ in specs]
    fig = lambda **kw: {k: kw.get(k) for k in keys}  # noqa: E731
    servers = {
        "ours": _server(True, [fig(batch1_p50_ms=10, mixed_rps=50, rss_mib_1=100, hot_p99_ms=20,
                                   hot_p99_during_cold_ms=60),
                               fig(batch1_p50_ms=30, mixed_rps=70, rss_mib_1=120, hot_p99_ms=20,
                                   hot_p99_during_cold_ms=40)]),
        "slow": _server(False, [fig(batch1_p50_ms=40, mixed_rps=10, rss_mib_1=400)] * 2),
        "fast": _server(False, [fig(batch1_p50_ms=8, mixed_rps=20, rss_mib_1=800)] * 2),
    }
    best = cpu_peers.aggregate(servers, specs)
    assert best == {"batch1_p50_ms": "fast", "mixed_rps": "fast", "rss_mib_1": "slow"}
    ours = servers["ours"]
    assert ours["median"]["batch1_p50_ms"] == 20 and ours["per_round"]["batch1_p50_ms"] == [10, 30]
    assert ours["ratio_to_best_peer"]["batch1_p50_ms"] == pytest.approx(20 / 8)
    assert ours["ratio_to_best_peer"]["mixed_rps"] == pytest.approx(60 / 20)
    assert ours["ratio_to_best_peer"]["rss_mib_1"] == pytest.approx(110 / 400)
    assert ours["ratio_to_best_peer"]["cold_task_ms"] is None  # no peer has it
    assert ours["hot_p99_cold_over_alone"] == pytest.approx(50 / 20)
    lines = cpu_peers.table(servers, specs, max_peer_tasks=20)
    assert lines[2].startswith("| ours | 20.0 (2.50×) |") and "| — |" in lines[3]


def test_the_readme_table_is_rewritten_between_its_markers_only(tmp_path):
    specs = cpu_peers.figure_specs([1])
    keys = [k for k, _, _ in specs]
    fig = {k: None for k in keys} | {"batch1_p50_ms": 6.0, "mixed_rps": 160.0, "rss_mib_1": 500.0}
    servers = {"supermask-int8": _server(True, [fig]), "ort-int8": _server(False, [fig | {"batch1_p50_ms": 4.0}])}
    cpu_peers.aggregate(servers, specs)
    res = {"command": "bench --x", "hardware": {"cpu_model": "Some CPU", "logical_cpus": 2, "torch_threads": 2},
           "config": {"rounds": 1, "tasks_list": [1], "max_peer_tasks": 20}, "servers": servers}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{cpu_peers.README_BEGIN}\nold table\n{cpu_peers.README_END}\nafter\n")
    cpu_peers.update_readme(readme, res)
    text = readme.read_text()
    assert text.startswith(f"intro\n{cpu_peers.README_BEGIN}\n") and text.endswith(f"{cpu_peers.README_END}\nafter\n")
    assert "old table" not in text and "`bench --x` on Some CPU" in text
    assert "| supermask-int8 | 6.0 (1.50×) |" in text and "| ort-int8 | 4.0 (1.00×) |" in text
    cpu_peers.update_readme(readme, res)  # again: the same file (the markers stay)
    assert readme.read_text() == text
    for bad in ("no markers\n", f"{cpu_peers.README_END}\n{cpu_peers.README_BEGIN}\n"):
        readme.write_text(bad)
        with pytest.raises(ValueError):
            cpu_peers.update_readme(readme, res)
        assert readme.read_text() == bad  # left as it was


def test_tree_rss_of_this_process():
    import os

    assert tree_pids(os.getpid())[0] == os.getpid()
    assert tree_rss_bytes(os.getpid()) > 10 * 2**20
    assert tree_rss_bytes(2**22 + 12345) == 0  # no such process


def _peer_client(kind, backbone, names, onnx=None):
    from fastapi.testclient import TestClient

    runner = peer_app.make_runner(kind, str(backbone), names, threads=1, onnx_path=onnx, max_seq_length=32)
    return TestClient(peer_app.create_app(runner, kind)), runner


@pytest.mark.parametrize("kind", ["hf-fp32", "hf-int8"])
def test_peer_app_serves_the_route_of_this_server(kind, tiny_backbone_dir):
    client, runner = _peer_client(kind, tiny_backbone_dir, ["a", "b"])
    assert client.get("/healthz").json()["resident_tasks"] == 0
    r = client.post("/v1/tasks/a/predict", json={"inputs": ["a fine film", "dull"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "a" and len(body["predictions"]) == 2
    p = body["predictions"][0]
    assert p["label"] in p["scores"] and abs(sum(p["scores"].values()) - 1) < 1e-5
    assert client.post("/v1/tasks/b/predict", json={"inputs": [["a", "b"]]}).status_code == 200
    assert sorted(runner.models) == ["a", "b"]  # loaded on first request, one model each
    assert runner.models["a"] is not runner.models["b"]
    assert client.post("/v1/tasks/zzz/predict", json={"inputs": ["x"]}).status_code == 404
    assert client.post("/v1/tasks/a/predict", json={"inputs": []}).status_code == 422


def test_onnx_int8_export_and_peer(tiny_backbone_dir, tmp_path):
    if onnx_export.missing():
        pytest.skip(onnx_export.missing())
    path = onnx_export.export_int8(tiny_backbone_dir, tmp_path)
    assert path.name == "backbone-int8.onnx" and not (tmp_path / "backbone-fp32.onnx").exists()
    client, runner = _peer_client("ort-int8", tiny_backbone_dir, ["a"], onnx=str(path))
    hf_client, hf = _peer_client("hf-fp32", tiny_backbone_dir, ["a"])
    texts = ["a fine film", "dull , lifeless and far too long for what it is"]
    assert client.post("/v1/tasks/a/predict", json={"inputs": texts}).status_code == 200
    # same pooled features as the fp32 model, up to int8 rounding (the export keeps dynamic axes)
    q = runner.pooled(runner.model("a"), [(t, None) for t in texts])
    f = hf.pooled(hf.model("a"), [(t, None) for t in texts])
    cos = (q * f).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(f, axis=1)
    assert q.shape == f.shape and (cos > 0.9).all()


def test_openvino_peer_serves_the_route_and_says_what_it_compiled(tiny_backbone_dir, tmp_path):
    if onnx_export.missing_openvino():
        pytest.skip(onnx_export.missing_openvino())
    path = onnx_export.export_fp32(tiny_backbone_dir, tmp_path)
    runner = peer_app.make_runner("ov", str(tiny_backbone_dir), ["a", "b"], threads=1, onnx_path=str(path),
                                  max_seq_length=32)
    from fastapi.testclient import TestClient

    client = TestClient(peer_app.create_app(runner, "ov", concurrent=True))
    health = client.get("/healthz").json()
    assert health["runtime"] == "openvino" and health["precision"] in ("fp32", "bf16", "fp16")
    assert health["resident_tasks"] == 0 and health["compiled"] == {}
    texts = ["a fine film", "dull , lifeless and far too long for what it is"]
    r = client.post("/v1/tasks/a/predict", json={"inputs": texts})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2
    compiled = client.get("/healthz").json()["compiled"]
    assert compiled["PERFORMANCE_HINT"] and compiled["INFERENCE_NUM_THREADS"] == "1"
    assert compiled["INFERENCE_PRECISION_HINT"] in ("f32", "bf16", "f16")
    # one compiled model per task; the same pooled features as the torch model, up to the plugin's precision
    assert runner.model("a") is not runner.model("b")
    hf = peer_app.make_runner("hf-fp32", str(tiny_backbone_dir), ["a"], threads=1, onnx_path=None, max_seq_length=32)
    q = runner.pooled(runner.model("a"), [(t, None) for t in texts])
    f = hf.pooled(hf.model("a"), [(t, None) for t in texts])
    cos = (q * f).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(f, axis=1)
    assert q.shape == f.shape and (cos > 0.99).all()


def test_openvino_peer_without_openvino_is_skipped_with_the_reason(tiny_backbone_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "missing_openvino",
                        lambda: f"openvino not importable: {onnx_export.OPENVINO_HINT}")
    exported = []
    monkeypatch.setattr(onnx_export, "export_fp32", lambda *a, **k: exported.append(a))
    rc = cpu_peers.main(["--smoke", "--precisions", "", "--peers", "ov", "--backbone", str(tiny_backbone_dir),
                         "--out", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert rc == 2 and "skipping peer ov: openvino not importable" in out and "pip install -e '.[bench]'" in out
    assert exported == [] and not (tmp_path / "none.json").exists()  # nothing exported for a peer that cannot run


def test_a_peer_without_its_packages_is_skipped_with_how_to_install_them(tiny_backbone_dir, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(onnx_export, "missing", lambda: f"onnxruntime not installed: {onnx_export.INSTALL_HINT}")
    rc = cpu_peers.main(["--smoke", "--precisions", "", "--peers", "ort-int8", "--backbone", str(tiny_backbone_dir),
                         "--out", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert rc == 2 and "skipping peer ort-int8" in out and "pip install -e '.[bench]'" in out
    assert "no server can run here" in out and not (tmp_path / "none.json").exists()


@pytest.mark.real
def test_smoke_run_this_server_fp32_against_hf_fp32(tmp_path):
    from backbone import BackboneLoadError, default_backbone_path

    try:
        default_backbone_path()
    except BackboneLoadError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "peers"
    assert cpu_peers.main(["--smoke", "--precisions", "fp32", "--peers", "hf-fp32", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    servers = res["servers"]
    assert sorted(servers) == ["hf-fp32", "supermask-fp32"]
    assert res["config"]["tasks_list"] == [1, 4] and res["config"]["rounds"] == 1
    assert res["hardware"]["torch_threads"] >= 1 and res["hardware"]["cpu_model"]
    common = ["batch1_p50_ms", "batch32_p50_ms", "mixed_rps", "rss_mib_1", "rss_mib_4"]
    assert res["best_peer"] == {k: "hf-fp32" for k in common}  # the only peer is the best of every figure
    ours_only = ["cold_task_ms", "hot_p99_ms", "hot_p99_during_cold_ms"]
    for name, s in servers.items():
        assert len(s["rounds"]) == 1 and "figures" in s["rounds"][0], s["rounds"]
        for k in common:
            assert s["median"][k] > 0 and s["per_round"][k] == [s["median"][k]]
            ratio = s["ratio_to_best_peer"][k]
            assert ratio == pytest.approx(s["median"][k] / servers["hf-fp32"]["median"][k]) and ratio > 0
        assert s["median"]["batch32_p50_ms"] > s["median"]["batch1_p50_ms"]  # 32 sentences cost more than one
        for k in ours_only:
            assert (s["median"][k] > 0) if s["ours"] else (s["median"][k] is None)
    assert servers["hf-fp32"]["ratio_to_best_peer"]["batch1_p50_ms"] == 1.0
    hf_rss = servers["hf-fp32"]["rounds"][0]["rss_mib"]
    assert hf_rss["4"] > hf_rss["1"] > hf_rss["0"] > 0  # a model copy per task
    ours = servers["supermask-fp32"]["rounds"][0]
    assert ours["hot_during_cold"]["cold_tasks_loaded"] == 1 and len(ours["task_load_ms"]) == 2
    md = out.with_suffix(".md").read_text()
    assert res["hardware"]["cpu_model"] in md and "torch threads per server" in md
    assert "| supermask-fp32 |" in md and "| hf-fp32 |" in md and "## Every round" in md
    # --render: the .md and the README's table again from the saved JSON, nothing measured
    readme = tmp_path / "README.md"
    readme.write_text(f"{cpu_peers.README_BEGIN}\n{cpu_peers.README_END}\n")
    out.with_suffix(".md").unlink()
    assert cpu_peers.main(["--render", str(out.with_suffix(".json")), "--readme", str(readme)]) == 0
    assert out.with_suffix(".md").read_text() == md
    assert "| supermask-fp32 |" in readme.read_text()
