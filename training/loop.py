"""The optimisation loop and batched prediction shared by supermask training and the fine-tuning baseline."""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training.glue import Example, GlueTask

log = logging.getLogger(__name__)


def encode(tokenizer, examples: list[Example], max_len: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest member, truncated to ``max_len`` tokens."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    return tokenizer(a, b, truncation=True, max_length=max_len, padding=True, return_tensors="pt")


def labels_of(task: GlueTask, examples: list[Example]) -> torch.Tensor:
    """float32 ``[n]`` scores (regression) or int64 ``[n]`` class indices."""
    if task.problem_type == "regression":
        return torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
    return torch.tensor([int(e.label) for e in examples], dtype=torch.long)


def loss_fn(task: GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error for regression, cross-entropy otherwise."""
    if task.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1), labels)
    return nn.functional.cross_entropy(logits, labels)


def forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """``model(input_ids, attention_mask, token_type_ids)`` with the batch moved to ``device``."""
    b = {k: v.to(device) for k, v in batch.items()}
    return model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))


def run_steps(model: nn.Module, task: GlueTask, train_set: list[Example], tokenizer, opt: torch.optim.Optimizer,
              total_steps: int, *, batch_size: int, max_len: int, seed: int, warmup_ratio: float,
              desc: str, progress: bool = True, device: torch.device | str = "cpu",
              clip_norm: float | None = None, stop_on_interrupt: bool = False,
              on_epoch_end: Callable[[int, int], bool | None] | None = None,
              deadline: float | None = None, status: dict | None = None,
              checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None) -> list[float]:
    """``total_steps`` AdamW steps over reshuffled epochs with linear warm-up then linear decay
    (``transformers.get_linear_schedule_with_warmup``). Returns the loss of every step.

    ``stop_on_interrupt``: on Ctrl-C (``KeyboardInterrupt``) after at least one step, stop and return
    the losses of the steps done (fewer than ``total_steps``) so the caller can save the model.

    ``on_epoch_end(epoch, steps)``: called after every complete pass over ``train_set`` (``epoch`` counts
    from 1, ``steps`` is the number of optimizer steps so far), before the next pass starts; the model is
    put back in training mode after it returns. A final partial pass (fractional epochs, ``max_steps``)
    does not call it. When it returns True, training stops there (early stopping).

    ``deadline``: a ``time.monotonic()`` value; no step starts after it (``--max-minutes``).
    ``status``: entries shown beside the loss on the progress bar (e.g. the held-out metric that
    ``on_epoch_end`` writes into it).

    ``checkpoint(state)``: called after every complete pass (after ``on_epoch_end``) with the loop's own
    state, ``{"epoch", "losses", "scheduler", "order_generator", "torch_rng"}`` (the learning-rate schedule's
    ``state_dict``, the data-order generator's and the global torch generator's states): what, with the
    model and optimizer, a run needs to continue exactly. ``resume``: such a state; the loop continues from
    it (the returned losses include the earlier ones), giving the steps an uninterrupted run would.

    Raises:
        ValueError: an empty training set, or ``total_steps`` / ``batch_size`` below 1.
    """
    from transformers import get_linear_schedule_with_warmup

    if not train_set:
        raise ValueError("the training set is empty (check --train-limit and the data folder)")
    if total_steps < 1 or batch_size < 1:
        raise ValueError(f"total_steps and batch_size must be >= 1, got {total_steps} and {batch_size}")

    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total_steps), total_steps)
    gen = torch.Generator().manual_seed(seed)
    params = [p for group in opt.param_groups for p in group["params"]]
    model.train()
    losses: list[float] = []
    epoch = 0
    if resume is not None:
        losses = list(resume["losses"])
        epoch = int(resume["epoch"])
        sched.load_state_dict(resume["scheduler"])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # load_state_dict leaves the groups' lr
            group["lr"] = lr
        gen.set_state(resume["order_generator"])
        torch.set_rng_state(resume["torch_rng"])
    bar = tqdm(total=total_steps, initial=len(losses), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        while len(losses) < total_steps:
            order = torch.randperm(len(train_set), generator=gen).tolist()
            complete = True
            for i in range(0, len(order), batch_size):
                if len(losses) >= total_steps or (deadline is not None and time.monotonic() >= deadline):
                    complete = False
                    break
                batch_ex = [train_set[j] for j in order[i : i + batch_size]]
                logits = forward(model, encode(tokenizer, batch_ex, max_len), device)
                loss = loss_fn(task, logits.float(), labels_of(task, batch_ex).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(params, clip_norm)
                opt.step()
                sched.step()
                losses.append(loss.detach().item())
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", **(status or {}))
            epoch += 1
            if complete and on_epoch_end is not None:
                stop = on_epoch_end(epoch, len(losses))
                model.train()
                if checkpoint is not None:
                    checkpoint({"epoch": epoch, "losses": list(losses), "scheduler": sched.state_dict(),
                                "order_generator": gen.get_state(), "torch_rng": torch.get_rng_state()})
                if stop:
                    break
                if status:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", **status)
            if not complete:
                break
    except KeyboardInterrupt:
        if not (stop_on_interrupt and losses):
            raise
        log.warning("interrupted after %d of %d steps: stopping", len(losses), total_steps)
    finally:
        bar.close()
    return losses


@torch.no_grad()
def predict_examples(model: nn.Module, tokenizer, task: GlueTask, examples: list[Example], max_len: int,
                     batch_size: int = 64, device: torch.device | str = "cpu", desc: str | None = None) -> np.ndarray:
    """Class indices (int ``[n]``) or regression values (float ``[n]``) with ``model`` in eval mode."""
    model.eval()
    outs = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=desc is None):
        logits = forward(model, encode(tokenizer, examples[i : i + batch_size], max_len), device).float().cpu()
        outs.append(logits.squeeze(-1) if task.problem_type == "regression" else logits.argmax(-1))
    return torch.cat(outs).numpy()
