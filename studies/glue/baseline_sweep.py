"""Full fine-tuning baselines chosen on held-out data: learning rate × epochs (early stopping) × seeds.

Every run holds out the same 10 % of the task's train set as the supermask runs (seed 1234), fine-tunes every
weight of the fp32 backbone plus the head on the rest for ``--max-epochs`` epochs, and evaluates held-out and
dev after every epoch (``training.finetune``, ``eval_each_epoch``). Selection reads held-out figures only:

1. the learning rate and the epoch with the best held-out mean over ``--seeds``;
2. with ``--confirm-seeds``, the chosen learning rate is also run with those seeds, and the epoch is chosen
   again on the held-out mean over every seed at that learning rate.

Dev is reported for the chosen (learning rate, epoch) alone. That figure is the baseline the supermask is
judged against (``docs/results.md``, Table A).

    .venv/bin/python studies/glue/baseline_sweep.py --tasks CoLA --lrs 2e-5 5e-5 1e-4 --max-epochs 5 \\
        --confirm-seeds 1 2

Resumable: finished runs (``<out-dir>/runs/finetune-*.json``) are read back, not retrained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from studies.glue import common  # noqa: E402

STEM = "baseline_sweep"


def build_parser():
    p = common.base_parser(
        "baseline_sweep.py",
        "Full fine-tuning baselines with a held-out split of the train set: learning rate × epochs, evaluated "
        "after every epoch; the learning rate and the epoch are chosen on the held-out mean over seeds, dev is "
        "reported for the choice alone. Writes baseline_sweep-<tasks>.json / .md under --out-dir.",
        ("CoLA", "RTE"), "seeds of every learning rate (default: 0)")
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4], metavar="LR",
                   help="AdamW learning rates of the encoder")
    p.add_argument("--max-epochs", type=int, default=5,
                   help="length of every run (the linear decay ends there); epochs 1..N are candidates")
    p.add_argument("--confirm-seeds", nargs="+", type=int, default=[], metavar="SEED",
                   help="run the chosen learning rate with these seeds too; the epoch is chosen again on every "
                        "seed's held-out mean")
    return p


def _config(task: str, lr: float, seed: int, args) -> dict:
    return common.finetune_config(task, seed, args, heldout=True, lr=lr, epochs=float(args.max_epochs),
                                  max_steps=args.max_steps)


def plan_runs(args, tasks=None, lrs=None, seeds=None) -> list[tuple[str, dict]]:
    return [("finetune", _config(task, lr, seed, args))
            for task in (tasks or common.check_tasks(args.tasks)) for lr in (lrs or args.lrs)
            for seed in (seeds or args.seeds or [0])]


def _per_epoch(rec: dict, split: str, metric: str) -> dict[int, float]:
    """``{epoch: metric}`` of one run on ``split`` ("heldout" or "dev")."""
    return {e["epoch"]: float(e[split][metric]) for e in rec["result"].get("epochs", [])
            if e.get(split, {}).get(metric) is not None}


def _dev_at_epoch(row: dict) -> list[float]:
    """Each seed's dev figure (fraction) at ``row``'s epoch: reported for the chosen row only."""
    m = common.main_metric(row["task"])
    return [_per_epoch(x, "dev", m)[row["epoch"]] for x in row["records"]]


def candidates(records: list[dict]) -> list[dict]:
    """One row per (task, lr, epoch): the held-out figures of every seed at that epoch."""
    rows = []
    for (task, lr), recs in common.group(records, lambda r: (r["config"]["task"], r["config"]["lr"])).items():
        m = common.main_metric(task)
        per = [(r, _per_epoch(r, "heldout", m)) for r in recs]
        for ep in sorted({e for _, p in per for e in p}):
            have = [(r, p[ep]) for r, p in per if ep in p]
            rows.append({"task": task, "lr": lr, "epoch": ep, "seeds": [r["seed"] for r, _ in have],
                         "heldout": [h for _, h in have], "heldout_mean": float(np.mean([h for _, h in have])),
                         "records": [r for r, _ in have]})
    return rows


def choose(rows: list[dict], task: str, lr: float | None = None) -> dict | None:
    """The (lr, epoch) row with the best held-out mean (ties: fewer epochs, then the smaller lr), among the
    rows with the most seeds (a mean over fewer seeds, where some runs are missing, does not compete)."""
    ok = [r for r in rows if r["task"] == task and (lr is None or r["lr"] == lr)]
    full = max((len(r["seeds"]) for r in ok), default=0)
    ok = [r for r in ok if len(r["seeds"]) == full]
    return max(ok, key=lambda r: (r["heldout_mean"], -r["epoch"], -r["lr"])) if ok else None


def summarize(rows: list[dict], chosen: dict[str, dict], data_dir: str) -> str:
    lines = ["Full fine-tuning (every weight + the head, fp32 checkpoint, AdamW, weight decay 0.01, 10 % warm-up "
             "and linear decay over the whole run, batch 32, max length 128). Held-out: 10 % of train.tsv "
             "(seed 1234), never trained on. **Chosen on the held-out mean; dev shown only for the chosen row.**",
             "", "| task | lr | epoch | seeds | held-out (mean ± s.d.) | dev |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["lr"], r["epoch"])):
        m = common.main_metric(r["task"])
        is_chosen = chosen.get(r["task"]) is r
        dev = common.mean_sd(_dev_at_epoch(r)) if is_chosen else "(not chosen)"
        lines.append(f"| {r['task']}{' **chosen**' if is_chosen else ''} | {r['lr']:g} | {r['epoch']} | "
                     f"{' '.join(map(str, r['seeds']))} | {common.mean_sd(r['heldout'])} "
                     f"{common.METRIC_LABEL.get(m, m)} | {dev} |")
    for task, row in sorted(chosen.items()):
        maj = common.majority_baseline(task, data_dir)
        if maj:
            m = common.main_metric(task)
            lines.append(f"\n{task}: majority class on dev: {common.pct(maj[m])} {common.METRIC_LABEL.get(m, m)}.")
    return "\n".join(lines)


def chosen_baseline(rows: list[dict], chosen: dict) -> dict:
    """What Table A reads: ``{task: {"lr", "epoch", "seeds", "heldout", "dev"}}`` (figures as fractions)."""
    out = {}
    for task, r in chosen.items():
        m = common.main_metric(task)
        out[task] = {"lr": r["lr"], "epoch": r["epoch"], "seeds": r["seeds"], "metric": m, "heldout": r["heldout"],
                     "dev": _dev_at_epoch(r),
                     "runs": [x["name"] for x in r["records"]]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_epochs < 1:
        raise SystemExit(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.epochs is not None:
        raise SystemExit("--epochs does not apply here: every run lasts --max-epochs and epochs 1..N are candidates")
    common.setup(args)
    command = common.command_line("baseline_sweep.py", argv)
    records = common.run_all(plan_runs(args), args, command, "fine-tuning runs")
    missing = list(args.missing_runs)
    rows = candidates(records)
    chosen = {t: c for t in common.check_tasks(args.tasks) if (c := choose(rows, t)) is not None}
    extra = [s for s in args.confirm_seeds if s not in (args.seeds or [0])]
    if extra and chosen:
        for task, row in list(chosen.items()):
            records += common.run_all(plan_runs(args, [task], [row["lr"]], extra), args, command,
                                      f"{task} confirm seeds")
            missing += args.missing_runs
        rows = candidates(records)
        chosen = {t: choose(rows, t, chosen[t]["lr"]) for t in chosen}
    body = common.smoke_note(args) + summarize(rows, chosen, args.data_dir)
    if not chosen:
        body += ("\n\nNothing chosen: no run finished an epoch with a held-out evaluation (a --max-steps shorter "
                 "than one epoch, or --report-only before any run finished).")
    stem = STEM + "-" + "-".join(common.check_tasks(args.tasks))
    data = {"chosen": chosen_baseline(rows, chosen), "missing_runs": missing,
            "rows": json.loads(json.dumps([{k: v for k, v in r.items() if k != "records"} for r in rows]))}
    _, md = common.write_report(args.out_dir, stem, "Full fine-tuning baselines, chosen on held-out data", command,
                                body, data, records)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
