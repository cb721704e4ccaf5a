"""Recipe sweep with selection on held-out data: ν learning rate × epochs × max length × mask rule × seeds.

Every run holds out 10 % of the task's train set (seed 1234, the same rows for every run), trains the
supermask on the rest, refits the head on the served mask (penalty chosen on the held-out split) and
records the served mask's held-out and dev figures. The configuration is chosen on the **held-out mean over
seeds** only; dev is reported for the chosen configuration alone (the other rows show held-out figures).

    .venv/bin/python studies/glue/recipe_sweep.py --tasks RTE --mask-lrs 0.03 0.1 --epoch-grid 2 3 \\
        --max-lens 256 --seeds 0 1 2
    .venv/bin/python studies/glue/recipe_sweep.py --tasks CoLA --mask-lrs 0.3 --epoch-grid 6 --ship-to examples/masks

Resumable: finished runs (``<out-dir>/runs/*.json``) are read back, not retrained (shared with the other
study scripts by config hash).
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from studies.glue import common  # noqa: E402
from training import MASK_RULES, STE_KINDS  # noqa: E402  (torch-free)

STEM = "recipe_sweep"


def build_parser():
    p = common.base_parser(
        "recipe_sweep.py",
        "Supermask recipe sweep with a held-out split of the train set: every run refits its head on the served "
        "mask; the configuration is chosen on the held-out mean over seeds, dev is reported for it alone. Writes "
        "recipe_sweep[-<tasks>].json / .md under --out-dir.",
        ("RTE", "CoLA"), "seeds of every configuration (default: 0)")
    p.add_argument("--mask-lrs", nargs="+", type=float, metavar="LR", help="ν learning rates (default: the recipe's)")
    p.add_argument("--epoch-grid", nargs="+", type=float, metavar="E", help="epochs (default: the recipe's length)")
    p.add_argument("--max-lens", nargs="+", type=int, metavar="N", help="max sequence lengths (default: the recipe's)")
    p.add_argument("--mask-rules", nargs="+", choices=MASK_RULES, default=["sign"],
                   help="deterministic mask rules written to the bundle")
    p.add_argument("--stes", nargs="+", choices=STE_KINDS, default=["identity"],
                   help="straight-through estimators of the scores' gradient (TrainConfig.ste)")
    p.add_argument("--ship-to", metavar="DIR",
                   help="copy the chosen configuration's best held-out run to DIR/<TASK>.smask when it beats the "
                        "bundle there on its recorded held-out figure (a bundle without one is replaced)")
    return p


def plan_runs(args) -> list[tuple[str, dict]]:
    plan = []
    for task in common.check_tasks(args.tasks):
        r = common.RECIPES[task]
        for lr, ep, ml, rule, ste, seed in itertools.product(
                args.mask_lrs or [r.mask_lr], args.epoch_grid or [None], args.max_lens or [r.max_seq_length],
                sorted(args.mask_rules, key=lambda rule: rule != "sign"), args.stes, args.seeds or [0]):
            # sign runs first: a run with another rule is then derived from their saved scores, not trained
            over = {"mask_lr": lr, "max_seq_length": ml, "mask_rule": rule}
            if ste != "identity":  # only when set: the recorded runs' names (config hashes) stay as they were
                over["ste"] = ste
            if ep is not None:
                over.update({"epochs": ep, "max_steps": None})
            plan.append(("supermask", common.supermask_config(task, seed, args, heldout=True, **over)))
    return plan


def _key(rec: dict) -> tuple:
    c = rec["config"]
    return (c["task"], c["mask_lr"], c["max_steps"] or f"{c['epochs']:g} ep", c["max_seq_length"],
            c.get("mask_rule", "sign"), c.get("ste", "identity"))


def _heldout(rec: dict) -> float | None:
    m = common.main_metric(rec["config"]["task"])
    v = rec["result"].get("heldout", {}).get(m)
    return None if v is None else float(v)


def _n_heldout(row: dict) -> int:
    return sum(h is not None for h in row["heldout"])


def summarize(records: list[dict], data_dir: str, n_seeds: int) -> tuple[list[dict], str, dict]:
    """Rows per configuration, the Markdown table, and ``{task: chosen row}``: the best held-out mean among
    the rows with all ``n_seeds`` seeds finished (a task with none has no choice). Figures are fractions."""
    rows, chosen = [], {}
    for key, recs in common.group(records, _key).items():
        held = [_heldout(r) for r in recs]
        rows.append({"task": key[0], "mask_lr": key[1], "length": key[2], "max_len": key[3], "mask_rule": key[4],
                     "ste": key[5], "seeds": [r["seed"] for r in recs], "heldout": held,
                     "heldout_mean": float(np.mean([h for h in held if h is not None])) if any(
                         h is not None for h in held) else None,
                     "final_loss": float(np.mean([r["result"]["final_loss"] for r in recs])),
                     "sparsity": float(np.mean([r["result"]["sparsity"] for r in recs])), "records": recs})
    for task, trows in common.group(rows, lambda r: r["task"]).items():
        # a mean over fewer seeds is a noisier estimate, and a lucky seed would win on it alone: only the rows
        # with the task's full seed count compete (a report-only run can list rows whose seeds are not all done)
        ok = [r for r in trows if r["heldout_mean"] is not None and _n_heldout(r) >= n_seeds]
        if ok:
            chosen[task] = max(ok, key=lambda r: r["heldout_mean"])
    lines = ["Served deterministic mask after the head refit, int8 backbone. Held-out: 10 % of train.tsv "
             "(seed 1234), never trained on. **Chosen on the held-out mean, among the rows with every seed; dev shown "
             "only for the chosen row.**", "",
             "| task | ν lr | length | max len | mask rule | STE | seeds | held-out (mean ± s.d.) | final train loss | "
             "sparsity | dev (served) | dev Bernoulli mean (trained head) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], str(r["mask_lr"]), str(r["length"]), r["max_len"])):
        m = common.main_metric(r["task"])
        is_chosen = chosen.get(r["task"]) is r
        dev = (common.mean_sd([common.metric_of(x, m) for x in r["records"]]) if is_chosen
               else "(not chosen)" if _n_heldout(r) >= n_seeds
               else f"(not eligible: {_n_heldout(r)} of {n_seeds} seeds)")
        bern = common.bernoulli_cell(r["records"], m) if is_chosen else ""
        lines.append(f"| {r['task']}{' **chosen**' if is_chosen else ''} | {r['mask_lr']:g} | {r['length']} | "
                     f"{r['max_len']} | {r['mask_rule']} | {r['ste']} | {' '.join(map(str, r['seeds']))} | "
                     f"{common.mean_sd(r['heldout'])} {common.METRIC_LABEL.get(m, m)} | {r['final_loss']:.3f} | "
                     f"{100 * r['sparsity']:.2f} % | {dev} | {bern} |")
    for task in sorted(chosen):
        maj = common.majority_baseline(task, data_dir)
        if maj:
            m = common.main_metric(task)
            lines.append(f"\n{task}: majority class on dev: {common.pct(maj[m])} {common.METRIC_LABEL.get(m, m)}.")
    out = []
    for r in rows:
        m = common.main_metric(r["task"])
        row = {k: v for k, v in r.items() if k != "records"} | {"runs": [x["name"] for x in r["records"]],
                                                                 "chosen": chosen.get(r["task"]) is r}
        if row["chosen"]:  # dev only for the chosen row, as in the Markdown table
            row["dev"] = [common.metric_of(x, m) for x in r["records"]]
            row["bernoulli"] = [common.metric_of(x, m, bernoulli=True) for x in r["records"]]
        out.append(row)
    return out, "\n".join(lines), chosen


def ship(chosen: dict, args) -> list[str]:
    """Copy each task's chosen configuration's best held-out run when it beats the bundle already there.

    Only runs whose bundle is still on disk are candidates (bundles are not kept in git): when the best
    run's bundle is gone, the best of the rest ships and the line says which was passed over."""
    from mask_store.format import read_header_file

    out = []
    runs = Path(args.out_dir) / common.RUNS_SUBDIR

    def rank(r):
        return _heldout(r) if _heldout(r) is not None else float("-inf"), -r["seed"]

    for task, row in chosen.items():
        ranked = sorted(row["records"], key=rank, reverse=True)
        kept = [r for r in ranked if (runs / r["result"]["bundle"]).is_file()]
        best = kept[0] if kept else ranked[0]
        passed = [f"seed {r['seed']} (held-out {common.pct(_heldout(r))})" for r in ranked[:ranked.index(best)]]
        note = f"; bundle not on disk for {', '.join(passed)}" if passed else ""
        src, dst = runs / best["result"]["bundle"], Path(args.ship_to) / f"{task}.smask"
        m = common.main_metric(task)
        current = None
        if dst.is_file():
            header = read_header_file(str(dst))
            # a held-out figure counts only when the mask itself never trained on those rows: a legacy bundle
            # (mask trained on every row, head refitted later) scores its own training rows there
            if (header.training.get("config") or {}).get("heldout_fraction"):
                current = header.metrics.get("heldout", {}).get(m)
        if current is not None and current >= _heldout(best):
            out.append(f"{task}: not shipped, held-out {common.pct(_heldout(best))} ≤ shipped {common.pct(current)}")
        elif not src.is_file():
            out.append(f"{task}: not shipped, no run's bundle is on disk (best: {src})")
        else:
            shutil.copyfile(src, dst)
            had = common.pct(current) if current is not None else "none comparable"
            out.append(f"{task}: {best['name']} (held-out {common.pct(_heldout(best))}, shipped had {had}{note}) "
                       f"-> {dst}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    command = common.command_line("recipe_sweep.py", argv)
    records = common.run_all(plan_runs(args), args, command, "recipe sweep runs")
    rows, body, chosen = summarize(records, args.data_dir, len(args.seeds or [0]))
    shipped = ship(chosen, args) if args.ship_to else []
    if shipped:
        body += "\n\nShipping:\n\n" + "\n".join(f"- {s}" for s in shipped)
    stem = STEM + "-" + "-".join(common.check_tasks(args.tasks))
    _, md = common.write_report(args.out_dir, stem, "Supermask recipe sweep, chosen on held-out data", command,
                                common.smoke_note(args) + body,
                                {"rows": json.loads(json.dumps(rows, default=str)), "shipped": shipped,
                                 "missing_runs": args.missing_runs}, records)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
