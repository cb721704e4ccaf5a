"""benchmarks/gpu.py, run end to end on the CPU (float32, the fused path under the Triton interpreter).

The GPU is lent rarely; this keeps the benchmark from failing on its first real run for a reason a CPU
could have shown (an argument renamed in a kernel, a key missing from the report). The figures of a CPU
run are not checked as speeds, only as consistent numbers.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import gpu
from service.kernels import triton_masked as tm


def test_cpu_smoke_run_writes_a_consistent_report(tmp_path):
    # "tiny": two layers small enough for the interpreter, the same six matrices per layer as BERT
    rc = gpu.main(["--device", "cpu", "--models", "tiny", "--batches", "1,4", "--tasks", "1,3,8",
                   "--seq-len", "4", "--warmup", "0", "--iters", "1", "--swap-repeats", "1",
                   "--memory-tasks", "2", "--sparsity", "0.13", "--out-dir", str(tmp_path)])
    assert rc == 0
    (json_path,) = tmp_path.glob("gpu-*.json")
    (md_path,) = tmp_path.glob("gpu-*.md")
    report = json.loads(json_path.read_text())
    assert "smoke run" in report["meta"]["device"]

    # throughput: batch 1 caps every mix at one task (measured once); batch 4 gives 1 and 3 (8 is capped to 4)
    rows = [(r["batch"], r["tasks_in_batch"]) for r in report["throughput"]]
    assert rows == [(1, 1), (4, 1), (4, 3), (4, 4)]
    # the benchmark's own rule: on the CPU the fused kernel runs only under the interpreter (set by
    # tests/conftest.py when there is no CUDA; on a GPU machine this CPU smoke run has no fused path)
    with_fused = tm.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
    paths = ["complement"] + (["fused"] if with_fused else [])
    for r in report["throughput"]:
        assert r["rows"] == r["batch"] * 4
        for name in paths:
            assert f"{name}_error" not in r, r
            assert r[f"{name}_vs_dense"] == pytest.approx(r["dense_ms"] / r[f"{name}_ms"])

    # every path computes the masked product it claims to (float32 here: tight)
    errs = report["correctness"]["tiny"]
    assert {k.split("_")[1] for k in errs} == set(paths)
    assert all(0 <= v < 1e-5 for v in errs.values()), errs

    (swap,) = report["swap_in"]
    assert swap["matrices"] == 12
    assert swap["packed_bytes"] == sum(math.ceil(o * i / 8) for o, i in gpu.layer_shapes("tiny"))
    (mem,) = report["memory"]
    n = sum(o * i for o, i in gpu.layer_shapes("tiny"))
    assert mem["mask_information_bytes"] == n / 8 and mem["dense_fp16_copy_bytes"] == 2 * n
    if with_fused:  # the fused layout holds one bit per weight, padded to 32-bit words per row
        assert mem["fused_counted_bytes_per_task"] == sum(4 * o * math.ceil(i / 32) for o, i in gpu.layer_shapes("tiny"))
    md = md_path.read_text()
    assert "| tiny | 4 | 16 | 3 |" in md and "## Correctness" in md


def test_needs_cuda_unless_cpu_is_asked_for(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_rejects_unknown_model_and_bad_sparsity():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--models", "bert-large"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--sparsity", "1.5"])


def test_shape_defaults_follow_the_device():
    # on CUDA the shapes; on the CPU (a smoke run, fused path interpreted) the tiny shape, so that
    # `gpu.py --device cpu --quick` finishes in seconds instead of tens of minutes
    gpu_args = gpu.parse_args([])
    assert (gpu_args.models, gpu_args.seq_len) == ("bert-base,minilm", 128)
    cpu_args = gpu.parse_args(["--device", "cpu", "--quick"])
    assert (cpu_args.models, cpu_args.seq_len) == ("tiny", 8)
    assert gpu.layer_shapes("tiny") == [(32, 32)] * 4 + [(64, 32), (32, 64)] + [(32, 32)] * 4 + [(64, 32), (32, 64)]
    given = gpu.parse_args(["--device", "cpu", "--models", "minilm", "--seq-len", "16"])
    assert (given.models, given.seq_len) == ("minilm", 16)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--seq-len", "0"])
