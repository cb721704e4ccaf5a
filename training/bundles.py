"""Writing a trained model out: the bundle of its served mask and head, and output files written atomically.

Shared by :mod:`training.trainer` (supermask training), :mod:`training.refit` (head refit) and
:mod:`training.finetune` (baselines), so that none of them imports another for it.
"""

from __future__ import annotations

import datetime as _dt
import os
from importlib.metadata import version
from pathlib import Path

from backbone import Backbone
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, MASK_RULE, encode_bundle
from mask_store.local import atomic_write
from training.glue import GlueTask
from training.model import SupermaskModel


def build_bundle(model: SupermaskModel, backbone: Backbone, task: GlueTask, name: str, max_len: int,
                 training: dict, metrics: dict, mask_rule: str = MASK_RULE) -> bytes:
    """Encode the deterministic mask (each layer's ``1[ν > τ]``) and the head of a trained model as a bundle."""
    masks = {f"{n}.weight": layer.hard_mask().cpu().numpy() for n, layer in model.masked_layers().items()}
    head = {
        HEAD_WEIGHT: model.head.classifier.weight.detach().cpu().numpy(),
        HEAD_BIAS: model.head.classifier.bias.detach().cpu().numpy(),
    }
    return encode_bundle(
        task=name,
        problem_type=task.problem_type,  # type: ignore[arg-type]
        labels=list(task.labels),
        text_pairs=task.is_pair,
        max_seq_length=max_len,
        backbone_fingerprint=backbone.fingerprint,
        backbone_name=backbone.name,
        masks=masks,
        head=head,
        training=training,
        metrics=metrics,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        library_version=version("supermask-server"),
        mask_rule=mask_rule,
    )


def check_output(output: str | Path) -> None:
    """Refuse an output path that cannot take the bundle, before any training (creates its folder).

    Raises:
        ValueError: ``output`` is an existing folder. OSError: its folder cannot be created or written.
    """
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"output {str(output)!r} is a folder: give a file path, such as {str(path / 'task.smask')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"cannot write to the folder {str(path.parent)!r} of output {str(output)!r}")


def write_output(path: str | Path, data: bytes) -> None:
    """Write a run's output file (a bundle, a JSON result) atomically, creating its folder if missing.

    :func:`mask_store.local.atomic_write` (temporary ``.tmp-*`` file in the same folder, fsync,
    ``os.replace``, folder fsync, temporary file removed on any error) with the permission bits a
    plain ``open(path, "wb")`` gives (0o666 less the umask), so the file can be shared as before.

    Args:
        path: the file; its parent folders are created.
        data: the complete contents, bytes.
    Raises:
        OSError: the folder cannot be created or the file cannot be written; ``path`` is then unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o666)
