"""Bernoulli evaluation protocol: a fresh mask per batch vs one mask per sample.

The paper reports the mean ± s.d. of the dev metric over 10 masks sampled from
``Bern(σ(ν))`` (Radiya-Dixit & Wang 2020, Table 4). The figures recorded at
training time (``evaluate_bernoulli(per="batch")``) draw a fresh mask for each
batch of 64 dev examples, so one "sample" averages several masks and its s.d.
understates the spread between single masks. This script re-evaluates bundles
with their saved mask scores under ``per="mask"`` (one mask for the whole dev
set, seeded as at training time) and lists both side by side; the per-batch
figures are the ones recorded in each bundle's header, not recomputed.

    .venv/bin/python studies/glue/bernoulli_protocol.py runs/a.smask runs/b.smask
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "bernoulli_protocol"


def build_parser() -> argparse.ArgumentParser:
    from supermask.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="bernoulli_protocol.py", formatter_class=HelpFormatter,
        description="Re-evaluate bundles' Bernoulli samples with one mask per sample (the paper's protocol) beside "
                    "the per-batch figures recorded at training time. Needs each bundle's mask scores "
                    "(<bundle>.scores.safetensors). Writes bernoulli_protocol.json / .md under --out-dir.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle files (.smask) with their mask scores")
    p.add_argument("--samples", type=int, default=10, help="Bernoulli samples (masks) per bundle")
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR), help="GLUE tasks in the original TSV layout")
    p.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--dev-limit", type=int, help="evaluate on only the first N dev examples")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR), help="where bernoulli_protocol.json/.md go")
    return p


def evaluate_one(path: Path, args: argparse.Namespace) -> dict:
    """Both protocols' figures for one bundle.

    Raises:
        FileNotFoundError: the bundle or its mask scores file is missing.
    """
    from mask_store.format import read_header_file
    from supermask.evaluate import evaluate_bundle
    from training.trainer import scores_path

    if not scores_path(path).is_file():
        raise FileNotFoundError(f"{path}: mask scores file {scores_path(path)} not found (train without --no-scores)")
    h = read_header_file(str(path))
    res = evaluate_bundle(str(path), data_dir=args.data_dir, backbone=args.backbone, samples=args.samples,
                          dev_limit=args.dev_limit, bernoulli_per="mask")
    cfg = h.training.get("config", {})
    return {"bundle": str(path), "task": h.task, "metric": common.main_metric(res["glue_task"]),
            "seed": cfg.get("seed"), "mask_lr": cfg.get("mask_lr"), "dev_examples": res["dev_examples"],
            "deterministic": res["deterministic"], "per_batch_recorded": h.metrics.get("bernoulli", {}),
            "per_mask": res["bernoulli"], "seconds": res["seconds"]}


def report(rows: list[dict]) -> str:
    lines = ["| bundle | task | ν lr | seed | metric | deterministic | per batch of 64 (recorded) | one mask per sample |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(b: dict | None) -> str:
        return f"{common.pct(b['mean'])} ± {common.pct(b['std'])} (n={b['n']})" if b else "–"

    for r in rows:
        m = r["metric"]
        lines.append(f"| `{Path(r['bundle']).name}` | {r['task']} | {r['mask_lr']} | {r['seed']} | "
                     f"{common.METRIC_LABEL.get(m, m)} | {common.pct(r['deterministic'][m])} | "
                     f"{cell(r['per_batch_recorded'].get(m))} | {cell(r['per_mask'].get(m))} |")
    lines.append("\nFigures in %, GLUE dev; mean ± s.d. over the samples.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = [evaluate_one(Path(b), args) for b in args.bundles]
    common.write_rows_report("bernoulli_protocol.py", STEM, "Bernoulli samples: a fresh mask per batch vs one mask "
                             "per sample", argv, args.out_dir, report(rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
