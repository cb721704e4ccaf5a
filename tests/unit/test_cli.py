"""The ``supermask`` command line: --help texts and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from supermask import cli


@pytest.mark.parametrize("command", ["train", "evaluate", "refit-head", "inspect", "upgrade", "serve"])
def test_help_explains_every_option_without_none_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert not re.search(r"\(default:[^)]*\)\s*\(default:", out)  # never two defaults on one option
    if command == "train":
        assert "--mask-lr MASK_LR" in out and "(default: 0.1)" in out
        assert "training examples per optimizer step" in out


def test_inspect_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.smask")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("supermask inspect: error:") and "\n" not in err


def test_mask_rule_choices_are_the_trainers_and_an_unknown_rule_is_refused(capsys):
    from training.trainer import MASK_RULES as trainer_rules

    for rule in trainer_rules:  # every rule the trainer knows is accepted ...
        assert cli.build_parser().parse_args(["train", "MRPC", "--mask-rule", rule]).mask_rule == rule
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "MRPC", "--mask-rule", "median"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'median'" in err  # ... and argparse lists exactly those
    assert re.search(r"choose from (.*)\)", err).group(1).replace("'", "").split(", ") == list(trainer_rules)


def test_the_command_line_module_imports_no_torch():
    # --help and `supermask inspect` must stay fast: torch loads inside the subcommands only
    code = "import sys, supermask.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "SST-2", "--batch-size", "0"], "must be >= 1, got 0"),
    (["train", "SST-2", "--train-limit", "-3"], "must be >= 1, got -3"),
    (["train", "SST-2", "--max-steps", "ten"], "'ten' is not an integer"),
    (["train", "SST-2", "--bits", "16"], "invalid choice: 16"),
    (["evaluate", "x.smask", "--samples", "-1"], "must be >= 0, got -1"),
])
def test_out_of_range_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_zero_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "data order, Bernoulli samples and head init (default: 0)" in out  # --seed
    assert "start pruned (ν=-5) (default: 0.0)" in out  # --init-sparsity


def test_unknown_device_is_a_one_line_error():
    from backbone import resolve_torch_device

    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_torch_device("gpu")


def test_upgrade_rewrites_v1_bundles_in_place_and_refuses_broken_ones(tmp_path, capsys):
    import json
    import struct

    from mask_store.format import HEADER_DIGEST_BYTES, MAGIC, decode_bundle, encode_bundle, frame

    shipped = decode_bundle((Path(__file__).resolve().parents[2] / "examples" / "masks" / "MRPC.smask").read_bytes())
    h = shipped.header
    good = encode_bundle(task=h.task, problem_type=h.problem_type, labels=h.labels, max_seq_length=h.max_seq_length,
                         backbone_fingerprint=h.backbone_fingerprint, head=shipped.head, text_pairs=h.text_pairs,
                         masks={m.name: shipped.mask_array(m.name) for m in h.masks}, format_version=2)
    (hlen,) = struct.unpack_from("<I", good, 8)
    header = json.loads(good[12:12 + hlen]) | {"format_version": 1}
    v1 = tmp_path / "MRPC.smask"
    v1.write_bytes(frame(json.dumps(header).encode(), good[12 + hlen + HEADER_DIGEST_BYTES:], version=1))
    broken = tmp_path / "broken.smask"
    broken.write_bytes(good[:-7])
    assert cli.main(["upgrade", str(v1), str(broken)]) == 1  # one could not be upgraded
    out = capsys.readouterr()
    assert "upgraded to format v3" in out.out and "broken.smask: not upgraded" in out.err
    assert v1.read_bytes()[:8] == MAGIC and decode_bundle(v1.read_bytes()).masks == decode_bundle(good).masks
    assert len(v1.read_bytes()) < len(good) / 3  # the masks entropy-coded (MRPC: 1.9 % sparsity)
    assert broken.read_bytes() == good[:-7]  # untouched
    assert cli.main(["upgrade", str(v1)]) == 0 and "already format v3" in capsys.readouterr().out


def test_serve_options_of_the_fleet_and_the_shared_store(capsys, tmp_path):
    args = cli.build_parser().parse_args(["serve", "--ray", "--replicas", "2", "--store-url", "s3://b/p",
                                          "--ray-address", "auto"])
    assert (args.ray, args.replicas, args.store_url, args.ray_address) == (True, 2, "s3://b/p", "auto")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--ray " in out and "Ray Serve" in out and "--store-url" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--ray", "--replicas", "0"])
    assert exc.value.code == 2


def test_store_location_is_the_url_else_the_directory_as_a_file_url(tmp_path, monkeypatch):
    from service.settings import Settings

    assert Settings(store_dir=tmp_path).store_location() == tmp_path.resolve().as_uri()
    assert Settings(store_dir=tmp_path, store_url="s3://bucket/masks").store_location() == "s3://bucket/masks"
    monkeypatch.setenv("SUPERMASK_STORE_OPTIONS", '{"endpoint_url": "http://x:9000"}')  # JSON, as documented
    assert Settings().store_options == {"endpoint_url": "http://x:9000"}


def with_training(bundle: bytes, training) -> bytes:
    """``bundle`` with its header's ``training`` record replaced (re-framed; the server accepts any JSON there)."""
    import json
    import struct

    from mask_store.format import MAGIC, decode_bundle, decode_header, frame

    header, start = decode_header(bundle)
    (hlen,) = struct.unpack_from("<I", bundle, len(MAGIC))
    raw = json.loads(bundle[len(MAGIC) + 4:len(MAGIC) + 4 + hlen]) | {"training": training}
    out = frame(json.dumps(raw).encode(), bundle[start:], header.format_version)
    decode_bundle(out)  # what a server accepts
    return out


@pytest.mark.parametrize("training,message", [
    ({"config": [1, 2]}, "training.config is a JSON list, not an object"),
    ({"config": "SST-2"}, "training.config is a JSON str, not an object"),
    ({"config": {"task": 5}}, "training.config.task is 5, not a GLUE task name"),
    ({"config": {"task": "SST-2", "bits": [8]}}, "training.config.bits is [8]: expected an integer 1..8 or 32"),
    ({"config": {"task": "SST-2", "bits": "8"}}, "training.config.bits is '8'"),
    ({"data": "mine.csv"}, "was trained on your own data (?): evaluate it with --test-file"),
    ({"data": {"sources": ["a"]}}, "was trained on your own data (?)"),
])
def test_evaluate_of_a_bundle_with_an_unusual_training_record_is_a_clear_error(
        training, message, tiny_backbone, tiny_backbone_dir, tmp_path, capsys):
    from tests.conftest import make_bundle

    path = tmp_path / "odd.smask"
    path.write_bytes(with_training(make_bundle(tiny_backbone, "odd"), training))
    code = cli.main(["evaluate", str(path), "--data-dir", str(tmp_path), "--backbone", str(tiny_backbone_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("supermask evaluate: error:") and message in err and "\n" not in err


def test_recorded_config_tolerates_what_is_not_needed():
    from supermask.evaluate import recorded_config

    assert recorded_config({}, need_task=True) == (None, 8)
    assert recorded_config({"config": None}, need_task=True) == (None, 8)
    assert recorded_config({"config": {"task": "RTE", "bits": 32}}, need_task=True) == ("RTE", 32)
    assert recorded_config({"config": [1]}, need_task=False) == (None, 8)  # --glue-task names the task
    assert recorded_config({"config": {"task": {"x": 1}}}, need_task=False) == (None, 8)
