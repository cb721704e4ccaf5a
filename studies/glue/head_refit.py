"""Head refit of given bundles, measured before and after through the serving path.

For each bundle: :func:`training.refit.refit_bundle` (freeze its stored mask, cache the pooled
features of the task's train set under it, refit the head, choose the penalty on the held-out split
carved from train), then :func:`supermask.evaluate.evaluate_bundle` on the old and the new bundle:
the served deterministic mask over the int8 backbone, GLUE dev. Dev is reported, never chosen on:
``--ship-to`` copies a refitted bundle only when it beats the old one on the held-out split.

    .venv/bin/python studies/glue/head_refit.py examples/masks/*.smask --ship-to examples/masks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "head_refit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="head_refit.py", formatter_class=common.HelpFormatter,
        description="Refit each bundle's head on its own served mask (choosing on a held-out split of the train "
                    "set) and evaluate old and new through the serving engine on GLUE dev. Writes head_refit.json / "
                    ".md under --out-dir and the refitted bundles under <out-dir>/runs/.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle files (.smask)")
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR), help="GLUE tasks in the original TSV layout")
    p.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=int, default=200, help="L-BFGS iterations per classification candidate")
    p.add_argument("--regression-scale", choices=("mse", "match-sd"), default="match-sd",
                   help="regression refit: ridge as is, or mapped to the fitting gold's mean and s.d.")
    p.add_argument("--train-limit", type=int,
                   help="fit on only the first N non-held-out training rows (SST-2's 60k rows cost a long feature "
                        "pass; a 384-wide head is well determined by far fewer)")
    p.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR), help="results folder")
    p.add_argument("--ship-to", help="copy each refitted bundle that beats the old one on the held-out split here")
    p.add_argument("--force", action="store_true", help="refit again even when the refitted bundle exists")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return p


def _refit_name(path: Path, args: argparse.Namespace) -> str:
    settings = {"steps": args.steps, "scale": args.regression_scale}
    if args.train_limit is not None and args.train_limit < _fit_rows(path, args):  # a limit that cuts this task
        settings["train_limit"] = args.train_limit
    digest = hashlib.sha256(path.read_bytes() + json.dumps(settings).encode()).hexdigest()
    return f"refit-{path.stem}-{digest[:12]}"


def _fit_rows(path: Path, args: argparse.Namespace) -> int:
    """Training rows left for fitting after the held-out split (what ``--train-limit`` could cut)."""
    from mask_store.format import read_header_file
    from training.glue import HELDOUT_FRACTION, HELDOUT_SEED, get_task, read_split, split_heldout

    header = read_header_file(str(path))
    split = header.training.get("heldout_split") or {}
    task = get_task(header.training.get("config", {}).get("task") or header.task)
    rows = read_split(task, args.data_dir, "train")
    return len(split_heldout(rows, split.get("fraction", HELDOUT_FRACTION), split.get("seed", HELDOUT_SEED))[0])


def run_one(path: Path, args: argparse.Namespace, command: str) -> dict:
    from mask_store.format import decode_bundle
    from supermask.evaluate import evaluate_bundle
    from training.refit import refit_bundle

    runs = Path(args.out_dir) / common.RUNS_SUBDIR
    name = _refit_name(path, args)
    out, rec_path = runs / f"{name}.smask", runs / f"{name}.json"
    if rec_path.is_file() and out.is_file() and not args.force:
        return json.loads(rec_path.read_text())
    refit = refit_bundle(str(path), str(out), args.data_dir, steps=args.steps, regression_scale=args.regression_scale,
                         backbone=args.backbone, train_limit=args.train_limit, command=command)
    header = decode_bundle(out.read_bytes()).header
    if header.problem_type == "regression":  # calibration and identical pairs are not in the old header
        before = evaluate_bundle(str(path), data_dir=args.data_dir, backbone=args.backbone, samples=0)
    else:  # the old header's figure, which the server reproduces (tests/integration/test_real_backbone.py)
        before = {"deterministic": decode_bundle(path.read_bytes()).header.metrics.get("deterministic", {}),
                  "source": "recorded in the old bundle (the served figure, checked by the integration tests)"}
    after = evaluate_bundle(str(out), data_dir=args.data_dir, backbone=args.backbone, samples=0)
    rec = {"name": name, "bundle": str(path), "refitted": out.name, "task": header.task,
           "metric": common.main_metric(header.training.get("config", {}).get("task") or header.task),
           "refit": refit, "served_before": before, "served_after": after,
           "hardware": _hardware(), "command": command,
           "git_commit": common.git_commit()}
    common._write_json(rec_path, rec)
    return rec


def _hardware() -> dict:
    from training.trainer import hardware

    return hardware()


def _better_on_heldout(rec: dict) -> bool:
    m = rec["metric"]
    before, after = rec["refit"]["before"]["heldout"], rec["refit"]["after"]["heldout"]
    if m in ("pearson", "spearman"):  # regression: judged on held-out MSE, the refit's own criterion
        return after["mse"] < before["mse"]
    return after[m] > before[m]


def render(records: list[dict]) -> str:
    lines = [
        "Served deterministic mask, int8 backbone, fp32 compute (`supermask evaluate`), GLUE dev; held-out: 10 % of "
        "train.tsv (seed 1234), not fitted on by the refit. The shipped masks and heads were trained on every train "
        "row, held-out ones included, so the old head's held-out figure is flattered against the refit's (and both "
        "are flattered by the mask). Ships: the refit beats the old head on the held-out split (regression: MSE; "
        "classification: the task's metric). Dev before: served (regression) or the figure the old bundle records, "
        "which the server reproduces (tests/integration); dev after: served. Log loss is the head's "
        "cross-entropy on dev (lower: better calibrated probabilities).", "",
        "| task | metric | held-out before | held-out after | dev before | dev after | dev log loss / MSE before → after "
        "| refit choice | ships |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        m = r["metric"]
        hb, ha = r["refit"]["before"]["heldout"], r["refit"]["after"]["heldout"]
        db, da = r["served_before"]["deterministic"], r["served_after"]["deterministic"]
        c = r["refit"]["choice"]
        choice = (f"ridge α={c['penalty']:g}, {c['scale']}" if c["model"] == "ridge"
                  else f"logistic λ={c['penalty']:g}{', balanced' if c.get('balanced') else ''}")
        loss = "mse" if "mse" in da else "log_loss"
        lb, la = r["refit"]["before"]["dev"][loss], r["refit"]["after"]["dev"][loss]
        lines.append(f"| {r['task']} | {common.METRIC_LABEL.get(m, m)} | {common.pct(hb[m])} | {common.pct(ha[m])} | "
                     f"{common.pct(db[m])} | {common.pct(da[m])} | {lb:.3f} → {la:.3f} | {choice} | "
                     f"{'yes' if _better_on_heldout(r) else 'no'} |")
    reg = [r for r in records if "calibration" in r["served_after"]]
    if reg:
        lines += ["", "Regression, served (dev): Pearson, Spearman, MSE, score mean and s.d. against gold, and "
                  "first dev sentences paired with themselves (gold 5).", "",
                  "| task | bundle | Pearson | Spearman | MSE | mean (gold) | s.d. (gold) | range | identical: mean, min, "
                  "share ≥ 4 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in reg:
            for label, ev in (("before", r["served_before"]), ("after", r["served_after"])):
                d, c, ident = ev["deterministic"], ev["calibration"], ev.get("identical_pairs", {})
                lines.append(
                    f"| {r['task']} | {label} | {d['pearson']:.3f} | {d['spearman']:.3f} | {d['mse']:.3f} | "
                    f"{c['mean']:.2f} ({c['gold_mean']:.2f}) | {c['sd']:.2f} ({c['gold_sd']:.2f}) | "
                    f"{c['min']:.2f} … {c['max']:.2f} | "
                    + (f"{ident['mean']:.2f}, {ident['min']:.2f}, {100 * ident['share_at_least_4']:.1f} % (n={ident['n']})"
                       if ident else "–") + " |")
    secs = sum(r["refit"]["seconds"] for r in records)
    lines += ["", f"Refit wall time: {secs / 60:.1f} min for {len(records)} bundles (feature pass + fit + dev), "
              "before the two served evaluations."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    command = common.command_line("head_refit.py", argv)
    records = [run_one(Path(b), args, command) for b in args.bundles]
    if args.ship_to:
        for r in records:
            if _better_on_heldout(r):
                dest = Path(args.ship_to) / Path(r["bundle"]).name
                shutil.copyfile(Path(args.out_dir) / common.RUNS_SUBDIR / r["refitted"], dest)
    body = render(records)
    _, md = common.write_report(args.out_dir, STEM, "Head refit on the served mask: before and after", command,
                                body, {"rows": [{k: v for k, v in r.items()} for r in records]}, [])
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
