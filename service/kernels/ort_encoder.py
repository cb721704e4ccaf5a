"""The BERT encoder as one ONNX Runtime graph, one session per hot task: ``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` in int8.

Semantics (same as reference): the lean encoder (:mod:`service.encoder`; transformers' ``BertModel`` in eval
mode, Devlin et al. 2019) followed by mean pooling over the attention mask, with every masked product
``x · (deq(W_q) ⊙ μ)ᵀ + b`` computed in int8 over the stored weight ``W_q ⊙ μ`` (exact: masking keeps the int8
grid) with the backbone's per-channel scales, as :func:`service.kernels.cpu_hot.hot_linear` computes it for the
same ``act_quant`` (``tests/unit/test_ort_tier.py`` checks the graph against that torch reference):

* ``act_quant="row"`` (the tier's default): each token's activations quantized to uint8 with its own min / max,
  ``x ≈ lo + step · q``, ``q = floor((x - lo) / step + 1/2)``, ``step = (hi - lo) / 255``; the product is
  ``step · (q · (W_q ⊙ μ)ᵀ · scale) + lo · rowsum + b`` with ``rowsum[o] = scale[o] · Σ_i (W_q ⊙ μ)[o, i]``
  (ONNX ``ReduceMin`` / ``ReduceMax`` and ``com.microsoft.MatMulIntegerToFloat``; ``b`` added by the fused op after
  the product, below): a row's result does not depend on the other rows of its batch;
* ``act_quant="tensor"``: one asymmetric uint8 scale for the whole input (ONNX ``DynamicQuantizeLinear``, fused as
  ``com.microsoft.DynamicQuantizeMatMul``: ``scale = (max(0, hi) - min(0, lo)) / 255``), as ONNX Runtime's own
  dynamic quantization does; faster, batch-dependent, and less accurate on the shipped tasks (docs in README).

Why: one graph runs the whole pass in C++ (no Python dispatch per op), takes any batch and length without
per-shape set-up (MLAS kernels, unlike a new oneDNN primitive per shape), and the weights are prepacked once per
session (README, "CPU precisions and runtimes", has the served figures against one-model-per-task peers).

The graph (opset 17 + ``com.microsoft`` contrib ops of ONNX Runtime's CPU provider): ``LayerNormalization`` of
the embeddings (looked up outside the graph, :meth:`OrtEncoder.embed`), then per layer one fused Q|K|V product,
``Split``, ``MultiHeadAttention`` (key padding mask from the attention mask), the output product,
``SkipLayerNormalization`` (residual + LayerNorm), the intermediate product, the activation (``BiasGelu`` for
``gelu``, ``FastGelu`` for the tanh forms, ``Relu``, ``x · Sigmoid(x)``), the output product,
``SkipLayerNormalization``; then the mean over unmasked tokens. Each product's bias is added by the fused op that
follows it (the attention's, the activation's or the LayerNorm's bias input), not by a node of its own. Inputs float32 ``embedded`` ``[batch, T, hidden]``
and int64 ``attention_mask`` ``[batch, T]``; output float32 ``pooled`` ``[batch, hidden]``.

Weights: each session's model bytes carry every group's int8 weight (the task's ``W_q ⊙ μ`` where it masks the
group, the plain ``W_q`` elsewhere) and the small constants (scales, biases, LayerNorms); ONNX Runtime prepacks the
weights and frees the unpacked copies, so a session owns its weights and nothing else of the process. The
embedding tables stay outside (one copy in the process).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping

import numpy as np
import torch

from service.encoder import LeanEncoder

#: ``config.hidden_act`` -> how the graph computes it (see the module docstring)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: activation quantization modes (see :class:`OrtEncoder`)
ACT_QUANT = ("row", "tensor")


def unavailable_reason() -> str | None:
    """Why the ONNX Runtime encoder cannot run in this process (``onnxruntime`` / ``onnx`` missing, or its
    CPU provider lacks the contrib ops), or None when it can. Probed once with a tiny graph."""
    return _probe()


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    lacking = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if lacking:
        return f"{' and '.join(lacking)} not installed (pip install onnxruntime onnx)"
    try:
        from onnx import TensorProto, helper

        import onnxruntime as ort

        node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "s", "z"], ["y"], domain="com.microsoft")
        graph = helper.make_graph(
            [node], "probe", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor("b", TensorProto.INT8, [2, 2], [1, 2, 3, 4]),
             helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 1.0]),
             helper.make_tensor("z", TensorProto.INT8, [2], [0, 0])])
        sess = ort.InferenceSession(_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"a": np.array([[1.0, 1.0]], np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"ONNX Runtime's int8 contrib ops do not run here: {type(exc).__name__}: {exc}"
    if not np.allclose(y, [[4.0, 6.0]], atol=0.1):
        return f"ONNX Runtime probe product {y.tolist()} differs from [[4, 6]]"
    return None


def _model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


class OrtEncoder:
    """Builds one ONNX Runtime session per task over a backbone's tensors.

    Args:
        encoder: the backbone's :class:`LeanEncoder` (its tensors and product groups; plain BERT layout).
        matrices: masked module name → ``(w_q int8 [out, in], scale float32 [out], bias float32 [out] or None)``.
        threads: intra-op threads of each session (the server's torch thread count).
        act_quant: how activations are quantized per product: "row" (each token's own min/max, as the torch int8
            tier does; a row's result does not depend on the other rows of its batch) or "tensor" (ONNX Runtime's
            ``DynamicQuantizeMatMul``: one scale for the whole input, faster, batch-dependent).

    Raises:
        ValueError: an activation the graph does not compute. RuntimeError: ONNX Runtime unavailable
            (:func:`unavailable_reason`).
    """

    def __init__(self, encoder: LeanEncoder,
                 matrices: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], threads: int = 1,
                 act_quant: str = "row"):
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        import onnxruntime as ort

        self._ort = ort
        self.threads = max(1, int(threads))
        self.encoder = encoder
        self.groups = encoder.groups
        self.hidden = encoder.hidden
        act = _activation_name(encoder)
        self.shapes: dict[str, tuple[int, int]] = {}  # group -> (out, in)
        self.members_shapes = {n: tuple(int(d) for d in w[0].shape) for n, w in matrices.items()}  # module -> (out, in)
        self._const: dict[str, np.ndarray] = {}  # every tensor of the graph but the products' weights
        self.base: dict[str, torch.Tensor] = {}  # group -> the plain int8 W_q [out, in] (members concatenated)
        self._base_rowsum: dict[str, np.ndarray] = {}  # group -> int64 [out]: Σ_i W_q[o, i]
        for g, members in self.groups.items():
            w_q = torch.cat([matrices[m][0] for m in members])
            scale = torch.cat([matrices[m][1] for m in members])
            biases = [matrices[m][2] for m in members]
            bias = (torch.cat([b.float() for b in biases]) if all(b is not None for b in biases)
                    else torch.zeros(w_q.shape[0]))
            self.shapes[g] = (int(w_q.shape[0]), int(w_q.shape[1]))
            self.base[g] = w_q.contiguous()
            self._base_rowsum[g] = self.base[g].numpy().sum(axis=1, dtype=np.int64)
            self._const[f"{g}.scale"] = scale.float().numpy()
            self._const[f"{g}.zero"] = np.zeros(w_q.shape[0], np.int8)
            self._const[f"{g}.bias"] = bias.float().numpy()
        if act_quant not in ACT_QUANT:
            raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
        self.act_quant = act_quant
        self._nodes, extra = _graph(encoder, act, act_quant)
        self._const.update(extra)
        from onnx import numpy_helper

        self._const_protos = [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in self._const.items()]

    def const(self, name: str) -> np.ndarray:
        """A small constant of the graph by name (``"<group>.scale"``, ``"<group>.bias"``: float32 ``[out]``)."""
        return self._const[name]

    def weight_bytes(self) -> int:
        """Bytes of a session's int8 weights (every group: masked ones are the task's, the rest the plain ones)."""
        return sum(o * i for o, i in self.shapes.values())

    def session(self, masked: Mapping[str, torch.Tensor]):
        """An ``onnxruntime.InferenceSession`` whose groups in ``masked`` (group → int8 ``W_q ⊙ μ`` ``[out, in]``)
        carry a task's masks; every other group multiplies the plain weight ``W_q``.

        The weights are written into the session's model bytes (ONNX Runtime prepacks them and frees the
        unpacked copies), so a session owns its weights and nothing else of the process.

        Raises:
            ValueError: a group not in the graph, or a weight of the wrong shape or dtype.
        """
        self._check_groups(masked)
        weights, rowsums = {}, {}
        for g, w in masked.items():
            if w.dtype != torch.int8 or tuple(w.shape) != self.shapes[g]:
                raise ValueError(f"group {g}: expected int8 {list(self.shapes[g])}, got {w.dtype} {list(w.shape)}")
            weights[g] = np.ascontiguousarray(w.numpy().T)
            rowsums[g] = w.numpy().sum(axis=1, dtype=np.int64)
        return self._session(weights, rowsums)

    def session_pruned(self, pruned: Mapping[str, np.ndarray]):
        """:meth:`session` for a task given by its pruned weights: group → int64 ascending row-major positions in
        the group's ``[out, in]`` (a group absent, or with none, multiplies the plain ``W_q``). Built from the
        backbone's weights transposed to the graph's layout, zeros written at the positions and the row sums less
        the pruned values: no mask is unpacked or multiplied (a MiniLM promotion ~5-10 ms sooner).

        Raises:
            ValueError: a group not in the graph, or a position outside it.
        """
        self._check_groups(pruned)
        weights, rowsums = {}, {}
        for g, positions in pruned.items():
            if positions.size == 0:
                continue
            out, in_ = self.shapes[g]
            if int(positions.min()) < 0 or int(positions.max()) >= out * in_:
                raise ValueError(f"group {g}: a pruned position outside its {out} x {in_} weights")
            rows, cols = np.divmod(positions, in_)
            base = self.base[g].numpy()
            pruned_sum = np.bincount(rows, weights=base.reshape(-1)[positions], minlength=out)
            w_t = np.ascontiguousarray(base.T)  # the graph's [in, out]
            w_t.reshape(-1)[cols * out + rows] = 0
            weights[g], rowsums[g] = w_t, self._base_rowsum[g] - pruned_sum.astype(np.int64)
        return self._session(weights, rowsums)

    def _check_groups(self, given: Mapping[str, object]) -> None:
        unknown = set(given) - set(self.groups)
        if unknown:
            raise ValueError(f"no product group {sorted(unknown)[0]!r} in the encoder")

    def _session(self, weights_t: Mapping[str, np.ndarray], rowsums: Mapping[str, np.ndarray]):
        """The session over ``weights_t`` (group → int8 ``[in, out]``, C-contiguous; absent: the plain ``W_q``) with
        their row sums (group → int64 ``[out]``: the per-token quantization's ``lo · rowsum`` term)."""
        from onnx import TensorProto, helper, numpy_helper

        ort = self._ort
        inits = list(self._const_protos)
        for g in self.groups:
            w_t = weights_t.get(g)
            if w_t is None:
                w_t = np.ascontiguousarray(self.base[g].numpy().T)
            inits.append(numpy_helper.from_array(w_t, f"{g}.weight"))  # [in, out]
            if self.act_quant == "row":
                rowsum = rowsums.get(g, self._base_rowsum[g]).astype(np.float32) * self._const[f"{g}.scale"]
                inits.append(numpy_helper.from_array(rowsum, f"{g}.rowsum"))
        graph = helper.make_graph(
            self._nodes, "supermask_encoder",
            [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "seq", self.hidden]),
             helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
            [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", self.hidden])], inits)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the graph is fused already
        # the pool's threads spin between the nodes of a pass (a woken thread costs more than a small node: MiniLM at
        # batch 1 took 3.9 ms a pass without spinning, 2.9 with) and stop when the pass ends: many sessions take
        # turns, and an idle pool left spinning takes the CPU from the next one (three sessions in turn, spinning
        # on: 7.9 ms a pass)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.log_severity_level = 3
        # no per-session memory arena: each session's arena kept its largest pass's activations (MiniLM after one
        # 32-row pass: 104 MiB of RSS per session with it, 24.5 without; the pass ~15 % slower)
        opts.enable_cpu_mem_arena = False
        return ort.InferenceSession(_model(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Word + position + token-type embeddings float32 ``[batch, T, hidden]`` (before the LayerNorm, which the
        graph applies): a table lookup, kept out of the graph so that no session holds a copy of the tables."""
        word, position, token_type = self.encoder.word, self.encoder.position, self.encoder.token_type
        x = torch.nn.functional.embedding(input_ids, word) + position[:input_ids.shape[1]]
        return x + (token_type[0] if token_type_ids is None else torch.nn.functional.embedding(token_type_ids, token_type))

    @staticmethod
    def run(session, embedded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states float32 ``[batch, hidden]`` of ``embedded`` float32 ``[batch, T, hidden]``
        (:meth:`embed`) under ``attention_mask`` int64 ``[batch, T]``."""
        feeds = {"embedded": embedded.detach().contiguous().numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])


def _activation_name(encoder: LeanEncoder) -> str:
    from service.encoder import ACTIVATIONS as TORCH_ACTIVATIONS

    for name, fn in TORCH_ACTIVATIONS.items():
        if fn is encoder.act and name in ACTIVATIONS:
            return name
    raise ValueError("the encoder's activation has no ONNX Runtime form here")


def _graph(encoder: LeanEncoder, act: str, act_quant: str = "row"):
    """The graph's nodes, and its tensors other than the products' weights, scales and biases."""
    from onnx import TensorProto, helper

    h, heads = encoder.hidden, encoder.heads
    t: dict[str, np.ndarray] = {
        "emb.gamma": encoder.emb_norm[0].detach().float().numpy(),
        "emb.beta": encoder.emb_norm[1].detach().float().numpy(),
        "split.qkv": np.array([h, h, h], np.int64), "axis.1": np.array([1], np.int64),
        "axis.2": np.array([2], np.int64), "tiny": np.array([1e-9], np.float32),
        "act.min_range": np.array([255e-30], np.float32),
        "act.levels": np.array([255.0], np.float32), "act.half": np.array([0.5], np.float32),
        "act.one": np.array([1.0], np.float32),
    }
    n = []

    def node(op, inputs, outputs, ms=False, **attrs):
        n.append(helper.make_node(op, inputs, outputs, domain="com.microsoft" if ms else "", **attrs))

    def product(group, x, y):
        """``y = x · (W_q ⊙ μ)ᵀ`` dequantized, without the bias: the fused op after each product adds it."""
        if act_quant == "tensor":
            node("DynamicQuantizeMatMul", [x, f"{group}.weight", f"{group}.scale", f"{group}.zero"], [y], ms=True)
            return
        # per row (token): x ≈ lo + step · q, q = floor((x - lo) / step + 1/2) in [0, 255], step = width / 255,
        # width = max(hi - lo, tiny); y = step · (q · (W_q ⊙ μ)ᵀ · scale) + lo · rowsum,
        # rowsum[o] = scale[o] · Σ_i (W_q ⊙ μ)[o, i]; the bias is added by the fused op that follows
        p = f"{y}.aq"
        node("ReduceMax", [x], [f"{p}.hi"], axes=[-1], keepdims=1)  # opset 17: axes is an attribute here
        node("ReduceMin", [x], [f"{p}.lo"], axes=[-1], keepdims=1)
        node("Sub", [f"{p}.hi", f"{p}.lo"], [f"{p}.range"])
        node("Max", [f"{p}.range", "act.min_range"], [f"{p}.width"])
        node("Div", ["act.levels", f"{p}.width"], [f"{p}.inv"])
        node("Sub", [x, f"{p}.lo"], [f"{p}.shift"])
        node("Mul", [f"{p}.shift", f"{p}.inv"], [f"{p}.scaled"])
        node("Add", [f"{p}.scaled", "act.half"], [f"{p}.t"])
        node("Cast", [f"{p}.t"], [f"{p}.q"], to=TensorProto.UINT8)  # truncation of a value in [0.5, 255.5]
        node("MatMulIntegerToFloat", [f"{p}.q", f"{group}.weight", "act.one", f"{group}.scale"], [f"{p}.raw"],
             ms=True)
        node("Div", [f"{p}.width", "act.levels"], [f"{p}.step"])
        node("Mul", [f"{p}.raw", f"{p}.step"], [f"{p}.prod"])
        node("Mul", [f"{p}.lo", f"{group}.rowsum"], [f"{p}.base"])
        node("Add", [f"{p}.prod", f"{p}.base"], [y])

    node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32)
    node("LayerNormalization", ["embedded", "emb.gamma", "emb.beta"], ["x0"], axis=-1,
         epsilon=float(encoder.emb_norm[2]))
    x = "x0"
    for i, (qkv, out, inter, down, ln1, ln2) in enumerate(encoder.layers):
        for k, (w, b) in enumerate((ln1[:2], ln2[:2])):
            t[f"l{i}.ln{k}.gamma"] = w.detach().float().numpy()
            t[f"l{i}.ln{k}.beta"] = b.detach().float().numpy()
        product(qkv, x, f"l{i}.qkv")
        node("Split", [f"l{i}.qkv", "split.qkv"], [f"l{i}.q", f"l{i}.k", f"l{i}.v"], axis=-1)
        node("MultiHeadAttention", [f"l{i}.q", f"l{i}.k", f"l{i}.v", f"{qkv}.bias", "mask32"], [f"l{i}.ctx"],
             ms=True, num_heads=heads)
        product(out, f"l{i}.ctx", f"l{i}.attn")
        node("SkipLayerNormalization", [f"l{i}.attn", x, f"l{i}.ln0.gamma", f"l{i}.ln0.beta", f"{out}.bias"],
             [f"l{i}.a"], ms=True, epsilon=float(ln1[2]))
        product(inter, f"l{i}.a", f"l{i}.inter")
        if act == "gelu":
            node("BiasGelu", [f"l{i}.inter", f"{inter}.bias"], [f"l{i}.act"], ms=True)
        elif act in ("gelu_new", "gelu_pytorch_tanh"):
            node("FastGelu", [f"l{i}.inter", f"{inter}.bias"], [f"l{i}.act"], ms=True)
        else:
            node("Add", [f"l{i}.inter", f"{inter}.bias"], [f"l{i}.pre"])
            if act == "relu":
                node("Relu", [f"l{i}.pre"], [f"l{i}.act"])
            else:  # silu / swish
                node("Sigmoid", [f"l{i}.pre"], [f"l{i}.sig"])
                node("Mul", [f"l{i}.pre", f"l{i}.sig"], [f"l{i}.act"])
        product(down, f"l{i}.act", f"l{i}.down")
        node("SkipLayerNormalization", [f"l{i}.down", f"l{i}.a", f"l{i}.ln1.gamma", f"l{i}.ln1.beta", f"{down}.bias"],
             [f"x{i + 1}"], ms=True, epsilon=float(ln2[2]))
        x = f"x{i + 1}"
    node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["maskf", "axis.2"], ["maskf3"])
    node("Mul", [x, "maskf3"], ["masked"])
    node("ReduceSum", ["masked", "axis.1"], ["summed"], keepdims=0)
    node("ReduceSum", ["maskf3", "axis.1"], ["count"], keepdims=0)
    node("Max", ["count", "tiny"], ["count1"])
    node("Div", ["summed", "count1"], ["pooled"])
    return n, t
