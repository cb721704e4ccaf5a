"""The peers' models: the backbone exported to ONNX offline (:func:`export_fp32`; the OpenVINO peer compiles it),
then dynamically quantized to int8 (:func:`export_int8`; the ONNX Runtime peer's).

``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: the newer exporter needs
``onnxscript``), inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` with dynamic batch and
sequence axes, output ``last_hidden_state``; then ``onnxruntime.quantization.quantize_dynamic`` with int8
weights per output channel (per-tensor scales lose most of MiniLM's accuracy: mean-pooled cosine to fp32
0.84-0.93 on short sentences, against 0.96+ per channel). Pooling and the task head run outside the graph.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install -e '.[bench]'   (or: .venv/bin/pip install 'onnxruntime>=1.17' 'onnx>=1.15')"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def missing() -> str | None:
    """Why the ONNX Runtime peer cannot run here (with how to install what it lacks), or None."""
    lacking = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if lacking:
        return f"{' and '.join(lacking)} not installed: {INSTALL_HINT}"
    return None


OPENVINO_HINT = "pip install -e '.[bench]'   (or: .venv/bin/pip install 'openvino>=2024.0' 'onnx>=1.15')"


def missing_openvino() -> str | None:
    """Why the OpenVINO peer cannot run here (with how to install what it lacks), or None. ``openvino`` is imported,
    not only looked up: a wheel that does not load on this machine counts as missing."""
    lacking = [m for m in ("onnx",) if importlib.util.find_spec(m) is None]
    try:
        importlib.import_module("openvino")
    except ImportError as exc:
        lacking.insert(0, f"openvino ({exc})" if importlib.util.find_spec("openvino") else "openvino")
    if lacking:
        return f"{' and '.join(lacking)} not importable: {OPENVINO_HINT}"
    return None


def export_fp32(backbone_dir: str | Path, out_dir: str | Path, opset: int = 17) -> Path:
    """Write ``out_dir/backbone-fp32.onnx`` (the backbone's float32 graph: inputs int64 ``[batch, seq]``, output
    ``last_hidden_state`` float32 ``[batch, seq, hidden]``) and return it.

    Raises:
        ImportError: torch's ONNX exporter lacks ``onnx``.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "backbone-fp32.onnx"
    model = AutoModel.from_pretrained(str(backbone_dir), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(backbone_dir), local_files_only=True)
    enc = tok(["a short example", "and a somewhat longer second example sentence"], padding=True,
              return_tensors="pt")

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    axes = {k: {0: "batch", 1: "seq"} for k in (*INPUT_NAMES, "last_hidden_state")}
    kwargs = dict(input_names=list(INPUT_NAMES), output_names=["last_hidden_state"], dynamic_axes=axes,
                  opset_version=opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy exporter's deprecation notice
        args = tuple(enc[k] for k in INPUT_NAMES)
        try:
            torch.onnx.export(Hidden(model), args, str(fp32), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5: no `dynamo` argument, the TorchScript exporter is the only one
            torch.onnx.export(Hidden(model), args, str(fp32), **kwargs)
    return fp32


def export_int8(backbone_dir: str | Path, out_dir: str | Path, opset: int = 17) -> Path:
    """Write ``out_dir/backbone-int8.onnx`` (dynamic int8 quantization of :func:`export_fp32`'s graph, which is
    removed afterwards) and return it.

    Raises:
        ImportError: onnx or onnxruntime missing (see :func:`missing`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export_fp32(backbone_dir, out_dir, opset)
    int8 = fp32.with_name("backbone-int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" notice
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    fp32.unlink(missing_ok=True)
    return int8


class MaskedModels:
    """Per-task copies of the int8 model of :func:`export_int8`, each with a task's supermask applied: the
    weights a user would get from fine-tuning the task and exporting it again, written without re-exporting.

    Every ``MatMulInteger`` weight of the template (int8 ``[in, out]``, quantized per output channel) is matched to
    the backbone parameter its node was exported from (node ``/m/encoder/layer.0/attention/self/query/MatMul_quant``
    → ``encoder.layer.0.attention.self.query.weight``); :meth:`write` sets a task's pruned weights to their channel's
    zero point (the quantized 0) and saves the model. The embeddings and everything else stay the template's.
    """

    def __init__(self, int8_path: str | Path):
        """Raises: ImportError without onnx; ValueError when the template has no ``MatMulInteger`` weights."""
        import onnx
        from onnx import numpy_helper

        self._model = onnx.load(str(int8_path))
        inits = {t.name: t for t in self._model.graph.initializer}
        self.weights: dict[str, tuple] = {}
        """parameter name -> (initializer, its int8 ``[in, out]`` values, zero point per output channel)."""
        for node in self._model.graph.node:
            if node.op_type != "MatMulInteger" or node.input[1] not in inits:
                continue
            parts = node.name.strip("/").split("/")[1:-1]  # drop the wrapper's "m" and the op's own name
            w = numpy_helper.to_array(inits[node.input[1]])
            zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] in inits else 0
            self.weights[".".join(parts) + ".weight"] = (inits[node.input[1]], w, np.broadcast_to(zp, w.shape[-1:]))
        if not self.weights:
            raise ValueError(f"{int8_path}: no MatMulInteger weights (not a dynamically quantized export)")

    def write(self, masks: dict[str, np.ndarray], path: str | Path) -> int:
        """Save the template with ``masks`` (parameter name -> bool ``[out, in]``, True keeps) applied to ``path``.

        Returns:
            The file's size in bytes.
        Raises:
            KeyError: a quantized weight of the template has no mask in ``masks``.
            ValueError: a mask's shape is not its weight's ``[out, in]``.
        """
        from onnx import numpy_helper

        for name, (init, w, zp) in self.weights.items():
            keep = np.asarray(masks[name], dtype=bool).T
            if keep.shape != w.shape:
                raise ValueError(f"mask of {name} is {keep.T.shape}, its weight [out, in] is {w.T.shape}")
            init.CopyFrom(numpy_helper.from_array(np.where(keep, w, zp).astype(w.dtype), init.name))
        data = self._model.SerializeToString()
        Path(path).write_bytes(data)
        return len(data)
