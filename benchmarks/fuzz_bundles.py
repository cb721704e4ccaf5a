"""Bundle fuzzing: seeded mutations of a valid bundle through the upload path, counts by outcome.

Every mutant must end in one of two ways: a *typed rejection* (a :class:`mask_store.errors.MaskStoreError`
or :class:`service.errors.ServiceError`, which the API maps to a 4xx/5xx JSON error), or an *accepted*
bundle that then serves finite answers of the right shape (every label a header label, probabilities
summing to 1, a finite value for regression). Anything else is a finding: an ``unexpected`` exception
(an untyped error: a 500), a ``bad_answer``, or a ``hang`` (a case over ``--case-timeout``).

Mutations (:func:`mutants`):

* ``truncate``: the bundle cut at an offset (every offset class: magic, length, header, digest, payload);
* ``bitflip``: 1-3 random bits flipped anywhere;
* ``bytes``: a run of random or special bytes (0x00, 0xFF, '{', '"') written over the bundle;
* ``header``: one field of the header replaced by a hostile value (wrong types, huge and negative
  numbers, NaN, deep nesting, long strings, lengths past the end), the header re-framed with a valid
  checksum so that the deeper checks are the ones reached;
* ``head``: the task head replaced by NaN, infinite or huge values, or a wrong shape (its SHA-256 and
  the header's recomputed);
* ``payload``: mask bits changed with consistent checksums and sparsities (such a bundle is valid and
  must serve); in a v3 bundle the changed mask is coded again (its section may change length and coding,
  the sections after it move);
* ``section``: a mask section's stored bytes corrupted (bits flipped, cut, extended, overwritten) with its
  SHA-256 and length made to agree, so that the section's contents reach the decoder: v3's Zstandard
  frame and gap stream, v2's packed bits and padding.

The CI test (``tests/fuzz/``) runs a bounded, seeded sample; this script runs long campaigns::

    .venv/bin/python benchmarks/fuzz_bundles.py --tiny --cases 100000 --out benchmarks/results/fuzz_bundles_tiny.json
    .venv/bin/python benchmarks/fuzz_bundles.py --cases 10000 --out benchmarks/results/fuzz_bundles.json

``--tiny``: bundles for a random 2-layer, hidden-32 BERT (the tests' backbone, MiniLM's tokenizer), so that
a mutant costs milliseconds; without it, the shipped SST-2 and STS-B bundles against the real backbone,
all-MiniLM-L6-v2 (the same code paths, 0.25-0.35 MB v3 bundles: slower per case). The bundles are written
as format v3 (the writer's default) and, with ``--also-v2``, once more as v2 (still read, still fuzzed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mask_store.errors import MaskStoreError  # noqa: E402
from mask_store.format import (  # noqa: E402
    CODED_VERSION,
    HEAD_BIAS,
    HEAD_WEIGHT,
    HEADER_DIGEST_BYTES,
    _sparsity_of_packed,
    decode_mask_section,
    encode_mask_section,
    frame,
)
from service.errors import ServiceError  # noqa: E402

KINDS = ("truncate", "bitflip", "bytes", "header", "head", "payload", "section")
HOSTILE_VALUES: tuple = (
    None, True, "", "x" * 10_000, "SUPMASK2", [], {}, [[[]]], 0, -1, 1, 7, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30,
    1e200, -1e200, 1e-300, 0.5, float("nan"), float("inf"), "NaN", [1e200, 1e200], [0, 0], [-1, 4], [1, 2, 3],
)
TEXTS = ("a short text", "x " * 600)  # the second one is truncated to the bundle's max length


class Hang(Exception):
    """A case ran past its time bound."""


def split(bundle: bytes) -> tuple[dict, bytes]:
    """``(header dict, payload)`` of a v2 or v3 bundle."""
    (hlen,) = struct.unpack_from("<I", bundle, 8)
    return json.loads(bundle[12:12 + hlen]), bundle[12 + hlen + HEADER_DIGEST_BYTES:]


def join(header: dict, payload: bytes) -> bytes:
    """Re-frame ``header`` (with a valid header checksum) around ``payload`` under the magic of its format
    version (v3 unless it says 2); NaN written as NaN."""
    version = header.get("format_version")
    return frame(json.dumps(header).encode("utf-8"), payload, version=2 if version == 2 else 3)


def _with_sections(header: dict, payload: bytes, replace: dict[str, bytes]) -> bytes:
    """The payload laid out again with the mask sections in ``replace`` (name -> stored bytes) swapped in:
    offsets, lengths and SHA-256 of every section rewritten in ``header`` (in place) so that they agree."""
    parts = sorted([(m["offset"], m["nbytes"], m) for m in header["masks"]]
                   + [(header["head"]["offset"], header["head"]["nbytes"], header["head"])], key=lambda x: x[0])
    out = bytearray()
    for offset, nbytes, entry in parts:
        blob = replace.get(entry.get("name"), payload[offset:offset + nbytes])
        entry.update(offset=len(out), nbytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        out += blob
    return bytes(out)


def _paths(value, prefix=()) -> list[tuple]:
    """Every path into nested dicts/lists of the header (the places a hostile value can go)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):  # the first few elements of long lists are enough
            out += _paths(v, prefix + (i,))
    return out


def _set(doc, path, value) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _deep(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def _mutate_header(rng: random.Random, header: dict, payload: bytes) -> bytes:
    h = copy.deepcopy(header)
    paths = _paths(h)
    path = rng.choice(paths)
    choice = rng.random()
    if choice < 0.7:
        value = rng.choice(HOSTILE_VALUES)
    elif choice < 0.8:
        value = _deep(rng.choice((20, 40, 300, 600)))
    elif choice < 0.9:  # lengths and offsets past the end
        value = len(payload) + rng.choice((1, 8, 1 << 20, 1 << 40))
    else:  # delete the field
        parent = h
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict):
            del parent[path[-1]]
            return join(h, payload)
        value = None
    _set(h, path, value)
    return join(h, payload)


def _mutate_head(rng: random.Random, header: dict, payload: bytes) -> bytes:
    from safetensors.numpy import save as st_save

    h = copy.deepcopy(header)
    out, hidden = h["head"]["tensors"][HEAD_WEIGHT]
    bad = rng.choice(("nan", "inf", "huge", "shape", "dtype"))
    w = np.zeros((out, hidden), dtype=np.float32)
    b = np.zeros((out,), dtype=np.float32)
    if bad == "nan":
        w[rng.randrange(out), rng.randrange(hidden)] = np.nan
    elif bad == "inf":
        b[rng.randrange(out)] = np.inf
    elif bad == "huge":
        w[:] = rng.choice((3e38, -3e38, 1e20))
    elif bad == "shape":
        w = np.zeros((out + 1, hidden), dtype=np.float32)
    else:
        w = w.astype(np.float64)
    blob = st_save({HEAD_WEIGHT: w, HEAD_BIAS: b})
    start = h["head"]["offset"]
    h["head"]["nbytes"] = len(blob)
    h["head"]["sha256"] = hashlib.sha256(blob).hexdigest()
    if bad == "shape" and rng.random() < 0.5:  # also claim the wrong shape
        h["head"]["tensors"][HEAD_WEIGHT] = [out + 1, hidden]
    return join(h, payload[:start] + blob)


def _mutate_payload(rng: random.Random, header: dict, payload: bytes) -> bytes:
    """Flip mask bits and make every checksum and sparsity agree: a valid bundle with other masks (v3: the
    mask coded again, :func:`mask_store.format.encode_mask_section`)."""
    h = copy.deepcopy(header)
    m = rng.choice(h["masks"])
    n = m["shape"][0] * m["shape"][1]
    section = payload[m["offset"]:m["offset"] + m["nbytes"]]
    packed = bytearray(decode_mask_section(m.get("coding", "packed"), section, m["shape"], m.get("pruned")))
    for _ in range(rng.randint(1, 64)):
        i = rng.randrange(n)
        packed[i // 8] ^= 0x80 >> (i % 8)
    m["sparsity"] = _sparsity_of_packed(bytes(packed), n)[0]
    if h["format_version"] >= CODED_VERSION:
        bits = np.unpackbits(np.frombuffer(bytes(packed), np.uint8), count=n).astype(bool)
        m["coding"], section, m["pruned"] = encode_mask_section(bits, h["format_version"])
    else:
        section = bytes(packed)
    total = sum(x["shape"][0] * x["shape"][1] for x in h["masks"])
    zeros = sum(x["sparsity"] * x["shape"][0] * x["shape"][1] for x in h["masks"])
    h["sparsity"] = zeros / total
    return join(h, _with_sections(h, payload, {m["name"]: section}))


def _mutate_section(rng: random.Random, header: dict, payload: bytes) -> bytes:
    """Corrupt one mask section's stored bytes and make its length and SHA-256 agree (the header's counts
    left as they were): the section's contents are what the reader meets."""
    h = copy.deepcopy(header)
    nonempty = [m for m in h["masks"] if m["nbytes"]] or h["masks"]
    m = rng.choice(nonempty)
    data = bytearray(payload[m["offset"]:m["offset"] + m["nbytes"]])
    how = rng.choice(("flip", "cut", "extend", "overwrite"))
    if how == "flip" and data:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "cut" and data:
        del data[rng.randrange(len(data)):]
    elif how == "extend":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif data:
        j = rng.randrange(len(data))
        run = rng.randint(1, 16)
        data[j:j + run] = bytes(rng.choice((0x00, 0xFF, rng.randrange(256))) for _ in range(run))
    return join(h, _with_sections(h, payload, {m["name"]: bytes(data)}))


def mutants(bundle: bytes, seed: int, count: int, kinds=KINDS) -> Iterator[tuple[str, bytes]]:
    """``count`` seeded mutants of ``bundle`` as ``(kind, bytes)``, kinds taken in turn."""
    rng = random.Random(seed)
    header, payload = split(bundle)
    (hlen,) = struct.unpack_from("<I", bundle, 8)
    marks = [0, 8, 12, 12 + hlen // 2, 12 + hlen, 12 + hlen + HEADER_DIGEST_BYTES, len(bundle) - 1]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "truncate":
            cut = rng.choice(marks) + rng.randint(-3, 3) if rng.random() < 0.5 else rng.randrange(len(bundle))
            yield kind, bundle[:max(0, min(cut, len(bundle) - 1))]
        elif kind == "bitflip":
            data = bytearray(bundle)
            for _ in range(rng.randint(1, 3)):
                # half the flips land in the prefix and header, where the parser works hardest
                j = rng.randrange(12 + hlen + HEADER_DIGEST_BYTES) if rng.random() < 0.5 else rng.randrange(len(data))
                data[j] ^= 1 << rng.randrange(8)
            yield kind, bytes(data)
        elif kind == "bytes":
            data = bytearray(bundle)
            j = rng.randrange(len(data))
            run = rng.randint(1, 16)
            fill = rng.choice((b"\x00", b"\xff", b"{", b'"', None))
            data[j:j + run] = (fill * run) if fill else bytes(rng.randrange(256) for _ in range(run))
            yield kind, bytes(data)
        elif kind == "header":
            yield kind, _mutate_header(rng, header, payload)
        elif kind == "head":
            yield kind, _mutate_head(rng, header, payload)
        elif kind == "payload":
            yield kind, _mutate_payload(rng, header, payload)
        else:
            yield kind, _mutate_section(rng, header, payload)


def check_answers(header, predictions: list[dict], rows: int) -> str | None:
    """None when the answers are finite and of the header's shape, else what is wrong."""
    if len(predictions) != rows:
        return f"{len(predictions)} predictions for {rows} rows"
    for p in predictions:
        if not isinstance(p.get("truncated", False), bool):
            return f"bad truncation flag {p}"
        if header.problem_type == "regression":
            if set(p) - {"truncated"} != {"value"} or not np.isfinite(p["value"]):
                return f"bad regression answer {p}"
            continue
        if p.get("label") not in header.labels:
            return f"label {p.get('label')!r} not among {header.labels}"
        scores = p.get("scores", {})
        if set(scores) != set(header.labels) or not all(np.isfinite(v) for v in scores.values()):
            return f"bad scores {scores}"
        if abs(sum(scores.values()) - 1.0) > 1e-3 or not np.isfinite(p.get("score", np.nan)):
            return f"scores do not form a distribution: {scores}"
    return None


def run_case(engine, task: str, data: bytes) -> tuple[str, str]:
    """Upload ``data`` as ``task`` through the engine (validation, build, atomic store), and on
    acceptance serve it. Returns ``(outcome, detail)``: outcome ``rejected``, ``accepted``,
    ``bad_answer`` or ``unexpected``."""
    from service.engine import PredictRequest

    try:
        header, _ = engine.register(task, data)
    except (MaskStoreError, ServiceError) as exc:
        return "rejected", type(exc).__name__
    except Exception as exc:  # an untyped error: the API would answer 500
        return "unexpected", f"register: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        rows = tuple((t, t) if header.text_pairs else (t, None) for t in TEXTS)
        answers = engine.predict(PredictRequest(task=task, inputs=rows))
        problem = check_answers(header, answers, len(rows))
        return ("bad_answer", problem) if problem else ("accepted", "served")
    except (MaskStoreError, ServiceError) as exc:
        return "unexpected", f"predict of an accepted bundle: {type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:
        return "unexpected", f"predict: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        try:
            engine.delete(task)
        except MaskStoreError:
            pass


def make_engine(backbone, store_dir: str):
    from mask_store.local import LocalMaskStore
    from service.engine import Engine
    from service.metrics import Metrics

    store = LocalMaskStore(store_dir, max_bundle_bytes=64 * 1024 * 1024)
    return Engine(backbone, store, Metrics(), cache_bytes=512 * 1024 * 1024, device="cpu", precision="fp32")


def campaign(engine, bundles: dict[str, bytes], cases: int, seed: int, case_timeout_s: float = 30.0,
             progress=None) -> dict:
    """Run ``cases`` mutants spread over ``bundles`` (task -> valid bytes). Returns counts by outcome,
    by kind and outcome, and the first findings (unexpected, bad answers, hangs)."""
    by_outcome: Counter = Counter()
    by_kind: Counter = Counter()
    rejections: Counter = Counter()
    findings: list[dict] = []
    per_bundle = max(1, cases // len(bundles))
    use_alarm = hasattr(signal, "SIGALRM")

    def on_alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    try:
        for b_i, (task, data) in enumerate(bundles.items()):
            for kind, mutant in mutants(data, seed + b_i, per_bundle):
                t0 = time.perf_counter()
                try:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, case_timeout_s)
                    outcome, detail = run_case(engine, task, mutant)
                except Hang:
                    outcome, detail = "hang", f"over {case_timeout_s} s"
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                by_outcome[outcome] += 1
                by_kind[f"{kind}:{outcome}"] += 1
                if outcome == "rejected":
                    rejections[detail] += 1
                elif outcome != "accepted" and len(findings) < 50:
                    findings.append({"task": task, "kind": kind, "outcome": outcome, "detail": detail,
                                     "seconds": round(time.perf_counter() - t0, 3)})
                if progress is not None:
                    progress.update(1)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    return {"cases": sum(by_outcome.values()), "by_outcome": dict(by_outcome), "by_kind": dict(sorted(by_kind.items())),
            "rejections": dict(rejections.most_common()), "findings": findings}


def tiny_backbone_folder(folder: Path) -> Path:
    """Save a random 2-layer, hidden-32 BertModel with the default backbone's tokenizer into ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from backbone import default_backbone_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_backbone_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_bundle(backbone, task: str, labels: list[str], text_pairs: bool, seed: int) -> bytes:
    """A valid bundle for ``backbone`` with random masks (10 % pruned) and a random head."""
    from mask_store.format import encode_bundle

    rng = np.random.default_rng(seed)
    masks = {f"{n}.weight": rng.random(tuple(backbone.qweight[n].shape)) >= 0.1 for n in backbone.masked}
    n_out = len(labels) or 1
    head = {HEAD_WEIGHT: rng.normal(size=(n_out, backbone.hidden_size)).astype(np.float32),
            HEAD_BIAS: rng.normal(size=(n_out,)).astype(np.float32)}
    return encode_bundle(task=task, problem_type="single_label_classification" if labels else "regression",
                         labels=labels, max_seq_length=32, backbone_fingerprint=backbone.fingerprint, masks=masks,
                         head=head, text_pairs=text_pairs)


def reencode(data: bytes, format_version: int = 3, task: str | None = None) -> bytes:
    """A valid bundle written again by :func:`mask_store.format.encode_bundle` as ``format_version`` (2 or 3),
    optionally under another task name: same masks, head and header fields."""
    from mask_store.format import decode_bundle, encode_bundle

    b = decode_bundle(data)
    h = b.header
    return encode_bundle(task=task or h.task, problem_type=h.problem_type, labels=h.labels,
                         max_seq_length=h.max_seq_length, backbone_fingerprint=h.backbone_fingerprint,
                         backbone_name=h.backbone_name, masks={m.name: b.mask_array(m.name) for m in h.masks},
                         head=b.head, text_pairs=h.text_pairs, training=h.training, metrics=h.metrics,
                         created_at=h.created_at, library_version=h.library_version, mask_rule=h.mask_rule,
                         format_version=format_version)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000, help="mutants in all (default 100,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundles", nargs="+", type=Path,
                    default=[REPO / "examples" / "masks" / "SST-2.smask", REPO / "examples" / "masks" / "STS-B.smask"],
                    help="valid bundles to mutate (default: the shipped SST-2 and STS-B)")
    ap.add_argument("--backbone", default=None, help="local Hugging Face folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--tiny", action="store_true",
                    help="fuzz bundles of a random 2-layer BERT instead (fast; --bundles and --backbone ignored)")
    ap.add_argument("--also-v2", action="store_true",
                    help="fuzz each bundle a second time written as format v2 (task name suffixed '.v2')")
    ap.add_argument("--case-timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--out", type=Path, default=None, help="write the counts as JSON here")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from backbone import load_backbone
    from mask_store.format import decode_header

    if args.tiny:
        tmp_model = tempfile.TemporaryDirectory()
        backbone = load_backbone(tiny_backbone_folder(Path(tmp_model.name)))
        bundles = {"cls": random_bundle(backbone, "cls", labels=["neg", "pos"], text_pairs=False, seed=1),
                   "sim": random_bundle(backbone, "sim", labels=[], text_pairs=True, seed=2)}
        args.bundles = []
    else:
        backbone = load_backbone(args.backbone)
        bundles = {}
    for path in args.bundles:  # re-encoded as v3, so that mutations meet the current format
        data = path.read_bytes()
        bundles[decode_header(data)[0].task] = reencode(data)
    if args.also_v2:
        bundles |= {f"{t}.v2": reencode(data, 2, task=f"{t}.v2") for t, data in bundles.items()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=args.cases, unit="case") as bar:
        result = campaign(make_engine(backbone, tmp), bundles, args.cases, args.seed, args.case_timeout, bar)
    result.update(seconds=round(time.perf_counter() - t0, 1), seed=args.seed, bundles=[p.name for p in args.bundles],
                  command="python benchmarks/fuzz_bundles.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps({k: result[k] for k in ("cases", "by_outcome", "seconds")}, indent=2))
    for f in result["findings"][:10]:
        print("finding:", f)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = sum(result["by_outcome"].get(k, 0) for k in ("unexpected", "bad_answer", "hang"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
