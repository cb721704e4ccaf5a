"""Shared pieces of the GLUE study scripts (``studies/glue/*.py``).

* :data:`RECIPES` — the one table of per-task training recipes (steps, ``ν``
  learning rate, max length) that every experiment starts from.
* :func:`get_or_run` — resumable runs: each run is one JSON file under
  ``<out-dir>/runs/``, named by a hash of its result-relevant config; a run whose
  file exists is not trained again (``--force`` re-runs). Runs with the same
  config are shared between experiments (the seed-0, ``s0 = 0``, int8 supermask
  of Table A is also the ``s0 = 0`` point of the sweep and the 8-bit row of the
  bit-width table).
* report writers: a combined JSON + a Markdown file per experiment, the exact
  command printed at the top.

Every run records its hardware, wall time, seed, git commit and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("studies.glue")

DEFAULT_OUT_DIR = REPO / "benchmarks" / "results" / "glue"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "glue"
ALL_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "WNLI")
PAPER_EXCLUDED = ("WNLI",)  # the paper leaves WNLI out of Table 4; we report it, marked
#: Radiya-Dixit & Wang 2020, Table 4 (BERT-base, GLUE dev): (fine-tuning baseline, low-sparsity supermask), in %
PAPER_TABLE4 = {"SST-2": (92.7, 91.3), "MRPC": (90.7, 91.3), "RTE": (67.1, 68.8), "CoLA": (55.2, 50.8),
                "STS-B": (88.5, 88.2)}
METRIC_LABEL = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}
RUNS_SUBDIR = "runs"


@dataclass(frozen=True)
class Recipe:
    """How one GLUE task is trained in this study (supermask and baseline)."""

    max_seq_length: int  # supermask max length (tokens)
    mask_lr: float  # AdamW learning rate of ν
    max_steps: int | None  # supermask optimizer steps; None: `epochs`
    epochs: float = 3.0
    head_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)  # default seeds of Table A
    tuned: bool = False  # True: measured on our backbone (docs/results.md, "Recipe probes")
    note: str = ""
    baseline_lr: float = 5e-5  # full fine-tuning; every recorded baseline ran at 5e-5
    baseline_epochs: float = 3.0
    baseline_max_seq_length: int = 128


#: The per-task recipes. SST-2 and MRPC come from the probes recorded in docs/results.md
#: ("Recipe probes"); the others are untuned first guesses.
RECIPES: dict[str, Recipe] = {
    "SST-2": Recipe(64, 0.1, 2000, seeds=(0,), tuned=True,
                    note="probe: 2,000 steps, ν lr 0.1 → acc 0.890, 2.8 % sparsity (max len 64)"),
    "MRPC": Recipe(128, 0.3, 350, tuned=True,
                   note="probe: 350 steps (~3 epochs), ν lr 0.3 → F1 0.866, 4.4 % sparsity"),
    "RTE": Recipe(128, 0.3, None, note="untuned: 3 epochs, ν lr 0.3 (as MRPC, a small pair task)"),
    "CoLA": Recipe(128, 0.3, None, note="untuned: 3 epochs, ν lr 0.3"),
    "STS-B": Recipe(128, 0.3, None, note="untuned: 3 epochs, ν lr 0.3"),
    "WNLI": Recipe(128, 0.3, None, note="untuned: 3 epochs (~60 steps), ν lr 0.3; excluded by the paper"),
}


# ---------------------------------------------------------------- command line


from supermask.cli import HelpFormatter  # noqa: E402  (one help formatter for every command line)
from training.glue import HELDOUT_FRACTION, HELDOUT_SEED  # noqa: E402  (numpy only, no torch)


def base_parser(prog: str, description: str, default_tasks: Iterable[str], seeds_help: str) -> argparse.ArgumentParser:
    """An argument parser with the options every training experiment shares."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(default_tasks), metavar="TASK",
                   help=f"GLUE tasks (from {', '.join(ALL_TASKS)})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help=seeds_help)
    p.add_argument("--max-steps", type=int,
                   help="optimizer steps of every run (overrides the recipe's steps/epochs; for smoke runs)")
    p.add_argument("--epochs", type=float, help="epochs of every run (overrides the recipe's steps/epochs)")
    p.add_argument("--train-limit", type=int, help="use only the first N training examples (smoke runs)")
    p.add_argument("--dev-limit", type=int, help="evaluate on only the first N dev examples (smoke runs)")
    p.add_argument("--bernoulli-samples", type=int, default=10,
                   help="dev evaluations with sampled masks μ ~ Bern(σ(ν)) per supermask run")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="GLUE tasks in the original TSV layout")
    p.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR),
                   help="results folder: runs/<run>.json (+ bundles), <experiment>.json/.md/.png")
    p.add_argument("--force", action="store_true", help="re-run runs whose result file already exists")
    p.add_argument("--no-scores", action="store_true",
                   help="do not keep the mask scores ν next to each bundle (~2 bytes per masked weight)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="auto",
                   help="where runs train: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... "
                        "(recorded per run, not part of its name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-step progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs already finished and list the missing ones")
    return p


def check_tasks(tasks: Iterable[str]) -> list[str]:
    """Canonical GLUE names; raises SystemExit naming an unknown task."""
    out = []
    for t in tasks:
        match = [k for k in ALL_TASKS if k.lower() == t.lower()]
        if not match:
            raise SystemExit(f"unknown task {t!r}; known: {', '.join(ALL_TASKS)}")
        out.append(match[0])
    return out


def setup(args: argparse.Namespace) -> None:
    """Logging and thread count, once per script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def command_line(script: str, argv: list[str] | None) -> str:
    """The exact command, runnable from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join([".venv/bin/python", f"studies/glue/{script}", *argv])


def steps_override(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides of a recipe's length from ``--max-steps`` / ``--epochs`` ({} when neither is given)."""
    if args.max_steps is not None:
        return {"max_steps": args.max_steps}
    if args.epochs is not None:
        return {"max_steps": None, "epochs": args.epochs}
    return {}


def smoke_note(args: argparse.Namespace) -> str:
    """A warning line for reports made with shortened runs or data (empty for full runs)."""
    limits = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("max_steps", "epochs", "train_limit", "dev_limit")
              if getattr(args, k, None) is not None]
    if not limits:
        return ""
    return f"> **Shortened runs ({', '.join(limits)}): a smoke test, not a result.**\n\n"


# ---------------------------------------------------------------- run configs


#: the validation split every held-out run (supermask or fine-tuning) carves from train.tsv: the same rows
#: for every run of a task (training.glue.split_heldout and its defaults)
HELDOUT_SPLIT = {"heldout_fraction": HELDOUT_FRACTION, "heldout_seed": HELDOUT_SEED}


def supermask_config(task: str, seed: int, args: argparse.Namespace, heldout: bool = False,
                     **overrides: Any) -> dict[str, Any]:
    """Result-relevant config of one supermask run (the keys of :class:`training.trainer.TrainConfig`).

    ``heldout``: hold out the train set's validation split and refit the head on the served mask
    (``heldout_fraction`` 0.1, seed 1234, ``head_refit_steps`` 200; see :data:`LEGACY_SUPERMASK`)."""
    r = RECIPES[task]
    cfg = {"task": task, "seed": seed, "backbone": args.backbone, "bits": 8, "max_seq_length": r.max_seq_length,
           "batch_size": 32, "epochs": r.epochs, "max_steps": r.max_steps, "mask_lr": r.mask_lr,
           "head_lr": r.head_lr, "warmup_ratio": 0.1, "init_sparsity": 0.0, "shuffle_weights": False,
           "train_limit": args.train_limit, "dev_limit": args.dev_limit,
           "bernoulli_samples": args.bernoulli_samples}
    if heldout:
        cfg.update({**HELDOUT_SPLIT, "head_refit_steps": 200})
    cfg.update(steps_override(args))
    cfg.update(overrides)
    return cfg


def finetune_config(task: str, seed: int, args: argparse.Namespace, heldout: bool = False,
                    **overrides: Any) -> dict[str, Any]:
    """Result-relevant config of one full fine-tuning baseline run (keys of ``FinetuneConfig``).

    ``heldout``: hold out the train set's validation split (fraction 0.1, seed 1234, as the supermask runs)
    and evaluate it and dev after every epoch, so the epochs can be chosen on held-out data."""
    r = RECIPES[task]
    cfg = {"task": task, "seed": seed, "backbone": args.backbone, "bits": 32,
           "max_seq_length": r.baseline_max_seq_length, "batch_size": 32, "epochs": r.baseline_epochs,
           "max_steps": None, "lr": r.baseline_lr, "weight_decay": 0.01, "warmup_ratio": 0.1,
           "train_limit": args.train_limit, "dev_limit": args.dev_limit}
    if heldout:
        cfg.update({**HELDOUT_SPLIT, "eval_each_epoch": True})
    cfg.update(steps_override(args))
    cfg.update(overrides)
    return cfg


def run_name(kind: str, config: dict[str, Any]) -> str:
    """``<kind>-<task>-s<seed>-<hash>``: the hash covers every config value, so any change is a new run."""
    digest = hashlib.sha256(json.dumps({"kind": kind, **config}, sort_keys=True, default=str).encode()).hexdigest()
    return f"{kind}-{config['task']}-s{config['seed']}-{digest[:12]}"


# ---------------------------------------------------------------- training


def train_supermask(config: dict[str, Any], bundle_path: Path, data_dir: str, save_scores: bool,
                    progress: bool, command: str = "", device: str = "auto") -> dict[str, Any]:
    """Train one supermask with :func:`training.trainer.train` (``command`` is recorded in the bundle);
    returns the JSON-able summary."""
    from training.trainer import TrainConfig, train

    cfg = TrainConfig(output=str(bundle_path), data_dir=data_dir, save_scores=save_scores, device=device,
                      **{**LEGACY_SUPERMASK, **config})
    res = train(cfg, progress=progress, command=command)
    if res.interrupted:  # the bundle so far stays on disk; no record, so a rerun trains this run again
        raise KeyboardInterrupt(f"training stopped after {res.steps} steps; unevaluated bundle at {bundle_path}")
    out = {"steps": res.steps, "train_seconds": round(res.seconds, 2), "first_loss": res.first_loss,
           "final_loss": res.final_loss, "sparsity": res.sparsity, "dev": res.dev_metrics,
           "bernoulli": res.bernoulli, "bundle": bundle_path.name, "device": res.device}
    if res.heldout_metrics:
        out["heldout"] = res.heldout_metrics
    if res.head_refit:
        out["head_refit"] = {"choice": res.head_refit["choice"], "before": res.head_refit["before"]}
    return out


#: What a supermask config that does not name them means: the runs recorded before held-out splits and
#: head refits existed trained on every train row and kept the head trained under sampled masks. A config
#: naming them (:func:`supermask_config` with ``heldout=True``) is a different run (a different name).
LEGACY_SUPERMASK = {"heldout_fraction": 0.0, "head_refit_steps": 0}


def train_finetune(config: dict[str, Any], data_dir: str, progress: bool, command: str,
                   device: str = "auto") -> dict[str, Any]:
    """Run one full fine-tuning baseline with :func:`training.finetune.finetune`; returns the summary."""
    from training.finetune import FinetuneConfig, finetune

    res = finetune(FinetuneConfig(data_dir=data_dir, device=device, **config), progress=progress, command=command)
    out = {"steps": res.steps, "train_seconds": res.train_seconds, "first_loss": res.first_loss,
           "final_loss": res.final_loss, "sparsity": 0.0, "dev": res.dev_metrics,
           "device": res.hardware.get("device", "cpu")}
    if res.heldout_metrics:
        out["heldout"] = res.heldout_metrics
    if res.epochs:
        out["epochs"] = res.epochs
    return out


def rule_source(config: dict[str, Any], runs: Path) -> dict[str, Any] | None:
    """The finished ``1[ν > 0]`` run that a run with another mask rule can be derived from, or None.

    The mask rule decides only which deterministic mask is written after training (``TrainConfig.mask_rule``),
    so a held-out run (head refit on) whose config differs from a finished one only in ``mask_rule``, and
    whose mask scores were kept, needs no training of its own: :func:`derive_mask_rule`. Runs with a
    ``dev_limit`` (smoke runs), fp32 (``bits`` 32) or shuffled-weights runs are trained: the refit runs the
    int8, unshuffled backbone."""
    if (config.get("mask_rule", "sign") == "sign" or not config.get("head_refit_steps") or config.get("dev_limit")
            or config.get("bits", 8) != 8 or config.get("shuffle_weights")):
        return None
    path = runs / f"{run_name('supermask', {**config, 'mask_rule': 'sign'})}.json"
    if not path.is_file():
        return None
    from training.trainer import scores_path

    rec = json.loads(path.read_text())
    bundle = runs / rec["result"]["bundle"]
    return rec if bundle.is_file() and scores_path(bundle).is_file() else None


def derive_mask_rule(config: dict[str, Any], source: dict[str, Any], bundle_path: Path, data_dir: str,
                     progress: bool, command: str) -> dict[str, Any]:
    """The result of a run that differs from ``source`` only in its mask rule, without training it again.

    :func:`training.refit.refit_bundle` rebuilds the served mask from the source's saved scores ``ν`` with
    ``config["mask_rule"]`` and refits the head on it, choosing its penalty on the same held-out split, as
    :func:`training.trainer.train` does after training. Training figures (steps, losses) and the Bernoulli
    figures (the trained head under sampled masks, which no deterministic rule changes) are the source's.
    The scores are copied beside the new bundle; ``derived_from`` names the source run."""
    import shutil

    from training.refit import refit_bundle, split_metrics
    from training.trainer import scores_path

    src = bundle_path.parent / source["result"]["bundle"]
    r = refit_bundle(str(src), str(bundle_path), data_dir, steps=config["head_refit_steps"],
                     regression_scale=config.get("regression_scale", "match-sd"), backbone=config.get("backbone"),
                     train_limit=config.get("train_limit"), progress=progress, command=command,
                     scores_file=str(scores_path(src)), mask_rule=config["mask_rule"])
    shutil.copyfile(scores_path(src), scores_path(bundle_path))
    keep = ("steps", "train_seconds", "first_loss", "final_loss", "bernoulli", "device")
    return {**{k: source["result"][k] for k in keep if k in source["result"]}, "sparsity": r["sparsity"],
            "dev": split_metrics(r["after"]["dev"])[0],
            # "before" here is the source run's refitted head on the new mask, not a head trained under sampled masks
            "heldout": r["after"]["heldout"], "head_refit": {"choice": r["choice"], "before_source_head": r["before"]},
            "bundle": bundle_path.name, "derived_from": source["name"], "source_finished_at": source["finished_at"],
            "derive_seconds": r["seconds"]}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as strict JSON through a temporary file and a rename (a crash leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def get_or_run(kind: str, config: dict[str, Any], args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The record of one run: read from ``<out-dir>/runs/<name>.json`` when present, else trained and written.

    ``kind`` is ``"supermask"`` or ``"finetune"``. The record holds ``name``, ``kind``, ``config``,
    ``result`` (metrics, sparsity, steps), ``seed``, ``hardware``, ``wall_seconds``, ``command``,
    ``started_at``, ``finished_at``, ``git_commit``; ``cached`` is True when it was read back.
    """
    from training.trainer import hardware

    runs = Path(args.out_dir) / RUNS_SUBDIR
    name = run_name(kind, config)
    path = runs / f"{name}.json"
    source = rule_source(config, runs) if kind == "supermask" else None
    if path.is_file() and not args.force:
        rec = json.loads(path.read_text())
        if not _stale_derivation(rec, source):
            rec["cached"] = True
            return rec
        log.info("re-deriving %s: its source %s was trained again", name, source["name"])
    started, t0 = _now(), time.perf_counter()
    progress = not args.quiet
    if source is not None:
        result = derive_mask_rule(config, source, runs / f"{name}.smask", args.data_dir, progress, command)
    elif kind == "supermask":
        result = train_supermask(config, runs / f"{name}.smask", args.data_dir, not args.no_scores, progress, command,
                                 device=getattr(args, "device", "auto"))
    elif kind == "finetune":
        result = train_finetune(config, args.data_dir, progress, command, device=getattr(args, "device", "auto"))
    else:
        raise ValueError(f"unknown run kind {kind!r}")
    hw = hardware()
    hw["device"] = result.get("device", "cpu")
    rec = {"name": name, "kind": kind, "config": config, "result": result, "seed": config["seed"],
           "hardware": hw, "wall_seconds": round(time.perf_counter() - t0, 2), "command": command,
           "started_at": started, "finished_at": _now(), "git_commit": git_commit()}
    _write_json(path, rec)
    rec["cached"] = False
    return rec


def _stale_derivation(rec: dict[str, Any], source: dict[str, Any] | None) -> bool:
    """True when ``rec`` was derived from ``source``'s scores and ``source`` finished training after that
    (``--force`` retrained it), so the derived mask and head no longer match the source's record."""
    if source is None or rec["result"].get("derived_from") != source["name"]:
        return False
    # ISO-8601 UTC stamps of one format compare as strings; records written before source_finished_at
    # existed are stale when the source finished after the derivation started
    return rec["result"].get("source_finished_at", rec["started_at"]) < source["finished_at"]


def run_all(plan: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, command: str,
            desc: str) -> list[dict[str, Any]]:
    """Run (or read back) every ``(kind, config)`` of ``plan`` in order, with a progress bar over runs."""
    from tqdm.auto import tqdm

    records = []
    args.missing_runs = []
    bar = tqdm(plan, desc=desc, unit="run", dynamic_ncols=True)
    for kind, config in bar:
        bar.set_postfix_str(f"{kind} {config['task']} seed {config['seed']}")
        name = run_name(kind, config)
        if getattr(args, "report_only", False) and not (Path(args.out_dir) / RUNS_SUBDIR / f"{name}.json").is_file():
            args.missing_runs.append(name)
            continue
        rec = get_or_run(kind, config, args, command)
        log.info("%s %s: %s", "cached" if rec["cached"] else "done", rec["name"], rec["result"]["dev"])
        records.append(rec)
    return records


# ---------------------------------------------------------------- metrics and formatting


def main_metric(task: str) -> str:
    from training.glue import get_task

    return get_task(task).main_metric


def metric_of(rec: dict[str, Any], metric: str | None = None, bernoulli: bool = False) -> float | None:
    """A run's deterministic-mask metric (or the mean over Bernoulli samples), as a fraction."""
    metric = metric or main_metric(rec["config"]["task"])
    res = rec["result"]
    if bernoulli:
        b = res.get("bernoulli", {}).get(metric)
        return None if b is None else float(b["mean"])
    v = res["dev"].get(metric)
    return None if v is None else float(v)


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}"


def mean_sd(values: list[float], digits: int = 1) -> str:
    """``m ± s`` in percent (s.d. across the values; just ``m`` for one value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return pct(vals[0], digits)
    return f"{pct(float(np.mean(vals)), digits)} ± {pct(float(np.std(vals)), digits)}"


def bernoulli_cell(recs: list[dict[str, Any]], metric: str) -> str:
    """Mean over runs of the Bernoulli-sample means ± mean within-run s.d. (n samples each), in percent."""
    bs = [r["result"].get("bernoulli", {}).get(metric) for r in recs]
    bs = [b for b in bs if b]
    if not bs:
        return "–"
    return f"{pct(float(np.mean([b['mean'] for b in bs])))} ± {pct(float(np.mean([b['std'] for b in bs])))}" \
           f" (n={bs[0]['n']})"


def majority_baseline(task: str, data_dir: str, dev_limit: int | None = None) -> dict[str, float] | None:
    """Dev metrics of always predicting the training set's most frequent label (None for regression)."""
    from training.glue import compute_metrics, get_task, read_split

    t = get_task(task)
    if t.problem_type == "regression":
        return None
    train = read_split(t, data_dir, "train")
    dev = read_split(t, data_dir, "dev")[:dev_limit]
    labels = [e.label for e in train]
    top = max(set(labels), key=labels.count)
    return compute_metrics(t, np.full(len(dev), top), np.array([e.label for e in dev]))


def hardware_summary(records: list[dict[str, Any]]) -> str:
    """One line per distinct hardware among ``records``."""
    seen: dict[str, int] = {}
    for r in records:
        hw = r.get("hardware", {})
        desc = (f"{hw.get('device', 'cpu')} ({hw.get('cuda') or hw.get('processor')}), {hw.get('cpu_count')} CPUs, "
                f"{hw.get('torch_threads')} torch threads, torch {hw.get('torch')}")
        seen[desc] = seen.get(desc, 0) + 1
    return "\n".join(f"- {n} run(s) on {d}" for d, n in seen.items())


def write_report(out_dir: str | Path, stem: str, title: str, command: str, body_md: str,
                 data: dict[str, Any], records: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (data + every run record) and ``<stem>.md`` (command at the top)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"experiment": stem, "command": command, "generated_at": _now(), "git_commit": git_commit(),
           **data, "runs": [{k: v for k, v in r.items() if k != "cached"} for r in records]}
    _write_json(out / f"{stem}.json", doc)
    total_s = sum(r.get("wall_seconds", 0.0) for r in records)
    runs_md = (f"Runs: {len(records)} ({total_s / 3600:.2f} h of training and evaluation in total); per-run records "
               f"(config, hardware, wall time, seed, command, commit) in `{RUNS_SUBDIR}/` and `{stem}.json`.\n"
               f"{hardware_summary(records)}\n\n") if records else ""
    missing = list(data.get("missing_runs") or [])
    if missing:
        runs_md += (f"Not run yet ({len(missing)}; this report was written with `--report-only`): "
                    + ", ".join(f"`{m}`" for m in missing) + "\n\n")
    md = (f"# {title}\n\nProduced by (from the repository root):\n\n```bash\n{command}\n```\n\n{body_md.rstrip()}\n\n"
          f"{runs_md}Generated {doc['generated_at']} at commit `{doc['git_commit'][:10]}`.\n")
    (out / f"{stem}.md").write_text(md)
    return out / f"{stem}.json", out / f"{stem}.md"


def write_rows_report(script: str, stem: str, title: str, argv: list[str] | None, out_dir: str | Path,
                      body_md: str, rows: list[dict[str, Any]]) -> None:
    """Write and print the report of a script that evaluates given bundles (no training runs):
    ``<stem>.json`` holds ``rows``, ``<stem>.md`` the exact command and ``body_md``."""
    _, md = write_report(out_dir, stem, title, command_line(script, argv), body_md, {"rows": rows}, [])
    print(md.read_text())


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'supermask-server[plots]'); skipping the PNG")
        return None
    return plt


def group(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return out
