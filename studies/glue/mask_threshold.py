"""Deterministic mask rule probe: ``1[σ(ν) > 0.5]`` vs a threshold matched to the sampled sparsity.

Training samples ``μ ~ Bern(σ(ν))`` (Radiya-Dixit & Wang 2020, Eq. 3-4), so the
network is trained under the *expected* sparsity ``mean(1 − σ(ν))``. The
deterministic rule ``μ = 1[ν > 0]`` prunes only the entries whose ``ν`` crossed
zero; when training moved many scores from +5 towards (but not past) zero, the
deterministic mask prunes far less than the masks the network was trained with.
This script evaluates, for each bundle with its ``.scores.safetensors``:

- ``τ = 0``, i.e. ``1[σ(ν) > 0.5]`` (the figure recorded in the bundle; our default rule: the paper
  reports the mean over 10 Bernoulli samples and states no deterministic rule);
- ``μ = 1[ν > τ_e]`` with one global ``τ_e`` chosen so the mask prunes exactly the
  expected sampled sparsity (computed from ``ν`` alone, no dev data involved);

next to the mean over Bernoulli samples recorded in the bundle.

    .venv/bin/python studies/glue/mask_threshold.py runs/a.smask runs/b.smask
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from studies.glue import common  # noqa: E402

STEM = "mask_threshold"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mask_threshold.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate bundles' deterministic masks under 1[ν > 0] and under a global "
                    "threshold matched to the expected Bernoulli sparsity mean(1 − σ(ν)). Needs each bundle's "
                    "mask scores (<bundle>.scores.safetensors). Writes mask_threshold.json / .md under --out-dir.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle files (.smask) with their mask scores")
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR),
                   help="GLUE tasks in the original TSV layout")
    p.add_argument("--backbone", default=None, help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on only the first N dev examples")
    p.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR), help="where mask_threshold.json/.md go")
    return p


def probe_bundle(path: Path, data_dir: str, backbone: str | None, dev_limit: int | None) -> dict:
    """Dev metrics of one bundle's masks at ``τ = 0`` and at the expected-sparsity threshold.

    Raises:
        FileNotFoundError: when the bundle or its mask scores file is missing.
    """
    from mask_store.format import decode_bundle
    from supermask.evaluate import model_from_scores
    from training.glue import compute_metrics, get_task, read_split
    from training.model import expected_sparsity, threshold_for_sparsity
    from training.trainer import predict, scores_path

    spath = scores_path(path)
    if not spath.is_file():
        raise FileNotFoundError(f"{path}: mask scores file {spath} not found (train without --no-scores)")
    bundle = decode_bundle(path.read_bytes())
    h = bundle.header
    cfg = h.training.get("config", {})
    task = get_task(h.task)
    dev = read_split(task, data_dir, "dev")[:dev_limit]
    golds = np.array([e.label for e in dev])
    model, bb = model_from_scores(bundle, spath, backbone, bits=int(cfg.get("bits", 8)))
    model.eval()

    def evaluate(tau: float) -> tuple[dict, float]:
        model.set_threshold(tau)
        preds = predict(model, bb.tokenizer, task, dev, h.max_seq_length, desc=f"dev {path.name} τ={tau:.3f}")
        return compute_metrics(task, preds, golds), model.sparsity()

    nu = [layer.scores.detach() for layer in model.masked_layers().values()]
    s_exp = expected_sparsity(nu)
    tau_e = threshold_for_sparsity(nu, s_exp)
    m0, sp0 = evaluate(0.0)
    me, spe = evaluate(tau_e)
    return {"bundle": str(path), "task": h.task, "metric": common.main_metric(task.name),
            "seed": cfg.get("seed"), "mask_lr": cfg.get("mask_lr"), "steps": h.training.get("steps"),
            "command": h.training.get("command", ""), "dev_examples": len(dev),
            "paper_rule": {"tau": 0.0, "sparsity": sp0, "dev": m0},
            "expected_sparsity": s_exp,
            "matched_rule": {"tau": tau_e, "sparsity": spe, "dev": me},
            "bernoulli_recorded": h.metrics.get("bernoulli", {})}


def report(rows: list[dict]) -> str:
    lines = ["| bundle | task | ν lr | seed | metric | 1[ν > 0]: sparsity % / metric | expected sampled sparsity % "
             "| 1[ν > τ_e]: τ_e / sparsity % / metric | Bernoulli mean ± s.d. (recorded) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metric"]
        b = r["bernoulli_recorded"].get(m)
        bcell = f"{common.pct(b['mean'])} ± {common.pct(b['std'])}" if b else "–"
        lines.append(
            f"| `{Path(r['bundle']).name}` | {r['task']} | {r['mask_lr']} | {r['seed']} | "
            f"{common.METRIC_LABEL.get(m, m)} | {100 * r['paper_rule']['sparsity']:.2f} / "
            f"{common.pct(r['paper_rule']['dev'][m])} | {100 * r['expected_sparsity']:.2f} | "
            f"{r['matched_rule']['tau']:.2f} / {100 * r['matched_rule']['sparsity']:.2f} / "
            f"{common.pct(r['matched_rule']['dev'][m])} | {bcell} |")
    lines.append("\nFigures in %, GLUE dev. Training commands (from the bundles' headers):\n")
    lines += [f"- `{Path(r['bundle']).name}`: `{r['command'] or 'not recorded'}`" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = [probe_bundle(Path(b), args.data_dir, args.backbone, args.dev_limit) for b in args.bundles]
    common.write_rows_report("mask_threshold.py", STEM, "Deterministic mask rule: 1[ν > 0] vs expected-sparsity "
                             "threshold", argv, args.out_dir, report(rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
