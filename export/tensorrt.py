"""TensorRT engines for a bundle, and a CPU-only check of its ONNX graphs for TensorRT blockers.

:func:`build_engines` uses the TensorRT Python API: ``OnnxParser``, a builder
config with a workspace limit, one optimization profile over the dynamic dims
(prompts B, points N, upscaled prompts U, selected masks K; ranges from the
manifest), and a timing cache that is read and written back. Engines go into
the bundle under ``engines/<gpu>-sm<cc>/trt<version>/<precision>/`` and the
manifest records them (with hashes); a build for the same key replaces them.

TensorRT 10 (JetPack 6) vs 11:

- fp16: TensorRT 10 sets ``BuilderFlag.FP16`` on the fp32 graph. TensorRT 11 has no
  precision builder flags (networks are strongly typed), so the graph itself is
  converted to fp16 (``onnxruntime.transformers.float16``, float32 inputs and
  outputs kept) and parsed into a ``STRONGLY_TYPED`` network.
- fp16 engines keep LayerNorm and softmax (and the reductions that compute a
  normalization's statistics, as in SAM's decomposed ``LayerNorm2d``) in FP32: other
  SAM deployments found that a full-fp16 ViT encoder silently gives wrong masks.
  :func:`fp32_nodes` picks the
  ONNX nodes and :func:`fp32_layer_reason` the TensorRT layers, both pure functions.
  TensorRT 10 sets them per layer (``layer.precision``, ``set_output_type`` and
  ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``); TensorRT 11, which removed those
  flags, gets them as FP32 islands in the fp16 graph (the converter's
  ``node_block_list`` puts casts around them).
- int8: TensorRT 10 calibrates the image encoder (``IInt8EntropyCalibrator2``) on
  sample images (preprocessed like the runtime does); the prompt and upscale
  engines are built fp16, whose inputs are not images. TensorRT 11 removed implicit
  quantization: INT8 needs Q/DQ nodes in the ONNX graph (e.g. from NVIDIA
  ModelOpt); a bundle may carry them as an ``int8-qdq`` version of a graph, which is
  then parsed as is. Without one, the build stops with that explanation.

:func:`check_trt` also says what it found: the prompts graph's dynamic prompt axis
(declared on the point inputs, not baked into the outputs by the graph, with its
optimization profile), which graph inputs are shape tensors (TensorRT needs INT32
there), and which ops stay FP32 in fp16 engines.

Only :func:`check_trt`, the FP32-layer selection and the missing-TensorRT /
missing-GPU errors run on a machine without a GPU; the build paths are written
against the documented API and have not run here.
"""

from __future__ import annotations

import datetime as _dt
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from samantic.runtime.bundle import Bundle, graph_input_shapes
from samantic.runtime.tensorrt import engine_key, gpu_info, import_cudart, import_tensorrt

GRAPHS = ("encoder", "prompts", "upscale")
DEFAULT_WORKSPACE_MB = 2048

# ONNX ops the TensorRT 10 ONNX parser supports (onnx-tensorrt operators.md, default domain)
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Bernoulli
BitShift BlackmanWindow Cast CastLike Ceil Celu Clip Compress Concat ConcatFromSequence Constant ConstantOfShape Conv
ConvTranspose Cos Cosh CumSum DFT DeformConv DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu
Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mod Mul Multinomial Neg
NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round
STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
# ops TensorRT parses, but not with a dynamic-quantization meaning (onnxruntime's INT8 graphs use them)
TRT_UNSUPPORTED_HINTS = {
    "MatMulInteger": "onnxruntime dynamic INT8; TensorRT INT8 needs Q/DQ or calibration on the fp32 graph",
    "ConvInteger": "onnxruntime dynamic INT8; TensorRT INT8 needs Q/DQ or calibration on the fp32 graph",
    "DynamicQuantizeLinear": "onnxruntime dynamic INT8 (TensorRT parses it only in limited forms)",
    "Unique": "data-dependent output shape",
}
TRT_IO_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT8", "UINT8", "BOOL"}
# (op, input index) pairs whose input TensorRT treats as a shape tensor
SHAPE_OPERANDS = {("Reshape", 1), ("Expand", 1), ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1),
                  ("Range", 2), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Resize", 3), ("OneHot", 1)}


# the prompts graph's inputs whose axis 0 is the prompt count (one grid batch per engine call)
PROMPT_INPUTS = ("point_coords", "point_labels")

# ONNX ops an fp16 engine runs in FP32, by what they are
FP32_OPS = {"LayerNormalization": "LayerNorm", "GroupNormalization": "GroupNorm",
            "InstanceNormalization": "InstanceNorm", "Softmax": "softmax", "LogSoftmax": "softmax"}
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
                        "ReduceLogSum", "ReduceLogSumExp", "ReduceProd"})
# element-wise and data-movement ops between a reduction and the normalization it feeds
PASS_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Neg", "Abs", "Max", "Min",
                      "Clip", "Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten"})
# TensorRT layer types (``trt.LayerType`` names) that compute in floating point; shape, constant and
# data-movement layers are left to the builder
FLOAT_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE", "ELEMENTWISE", "UNARY", "SCALE", "ACTIVATION"})


@dataclass
class Finding:
    """One TensorRT blocker (or warning) in a graph, or (severity ``"info"``) something the check found."""

    graph: str
    kind: str  # "unsupported-op", "io-type", "shape-tensor", "dynamic-dim", "prompt-axis", "fp16-fp32"
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.graph}: {self.kind}: {self.message}"


def check_graph(model, name: str, profiles: Dict[str, Any]) -> List[Finding]:
    """TensorRT blockers in one ONNX model (``onnx.ModelProto``): ops, I/O types, shape tensors, dynamic dims."""
    import onnx

    findings: List[Finding] = []
    g = model.graph
    ops: Dict[str, int] = {}
    for node in _all_nodes(g):
        if node.domain in ("", "ai.onnx"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        else:
            findings.append(Finding(name, "unsupported-op", f"{node.op_type} (domain {node.domain!r}) needs a TensorRT plugin"))
    for op, n in sorted(ops.items()):
        if op not in TRT_SUPPORTED_OPS or op in TRT_UNSUPPORTED_HINTS:
            hint = TRT_UNSUPPORTED_HINTS.get(op, "not in the TensorRT ONNX parser's operator list")
            findings.append(Finding(name, "unsupported-op", f"{op} x{n}: {hint}"))
    inits = {i.name for i in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in inits]
    for vi, role in [(i, "input") for i in graph_inputs] + [(o, "output") for o in g.output]:
        t = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
        if t not in TRT_IO_TYPES:
            sev = "warning" if t == "INT64" else "error"
            findings.append(Finding(name, "io-type", f"{role} {vi.name!r} is {t}; declare it INT32 (TensorRT's index and "
                                                     "shape type)" if t == "INT64" else f"{role} {vi.name!r} is {t}, "
                                                     "which TensorRT engines cannot take", sev))
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            if not d.dim_param:
                findings.append(Finding(name, "dynamic-dim", f"{role} {vi.name!r} axis {axis} has no size and no name; "
                                                            "TensorRT needs a named dim with a profile"))
            elif role == "input" and d.dim_param not in profiles:
                findings.append(Finding(name, "dynamic-dim", f"input {vi.name!r} axis {axis} is dynamic ({d.dim_param!r}) "
                                                            "but the manifest has no optimization profile for it"))
    input_names = {i.name: i for i in graph_inputs}
    for node in _all_nodes(g):
        for idx, tensor in enumerate(node.input):
            if (node.op_type, idx) in SHAPE_OPERANDS and tensor in input_names:
                t = onnx.TensorProto.DataType.Name(input_names[tensor].type.tensor_type.elem_type)
                if t != "INT32":
                    findings.append(Finding(name, "shape-tensor", f"graph input {tensor!r} ({t}) is a shape tensor "
                                                                 f"({node.op_type} input {idx}); TensorRT needs INT32"))
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.INT64 and init.dims and int(np.prod(init.dims)) <= 64:
            vals = onnx.numpy_helper.to_array(init)
            if np.any(vals > np.iinfo(np.int32).max) or np.any(vals < np.iinfo(np.int32).min):
                used_as_shape = any((n.op_type, i) in SHAPE_OPERANDS and t == init.name
                                    for n in _all_nodes(g) for i, t in enumerate(n.input))
                if used_as_shape and not all(n.op_type == "Slice" for n in _all_nodes(g) if init.name in n.input):
                    findings.append(Finding(name, "shape-tensor", f"INT64 shape constant {init.name!r} does not fit INT32",
                                            "warning"))
    return findings


def _all_nodes(graph) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def shape_tensor_inputs(model) -> Dict[str, List[str]]:
    """Graph inputs that TensorRT treats as shape tensors, with the ``"<op> input <i>"`` uses that make them so."""
    g = model.graph
    names = {i.name for i in g.input} - {i.name for i in g.initializer}
    uses: Dict[str, List[str]] = {}
    for node in _all_nodes(g):
        for idx, tensor in enumerate(node.input):
            if (node.op_type, idx) in SHAPE_OPERANDS and tensor in names:
                uses.setdefault(tensor, []).append(f"{node.op_type} input {idx}")
    return uses


def _first_dims_inferred(model) -> Dict[str, Any]:
    """Axis 0 of every output as ONNX shape inference derives it from the inputs (declared output shapes dropped):
    an int where the graph fixes it, a name or None where it stays free."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for o in probe.graph.output:
        o.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    dims: Dict[str, Any] = {}
    for o in inferred.graph.output:
        t = o.type.tensor_type
        d = t.shape.dim[0] if t.HasField("shape") and len(t.shape.dim) else None
        dims[o.name] = None if d is None else d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
    return dims


def check_prompt_axis(model, name: str, profiles: Dict[str, Any]) -> List[Finding]:
    """The prompts graph's prompt axis: dynamic on the point inputs, free in the outputs, with a profile.

    A decoder exported with a fixed prompt count builds, but its engine takes only
    that count; one whose graph bakes the export's sample batch into a reshape
    fails (or silently misreads) at any other count. Both are errors here.
    """
    g = model.graph
    inputs = {i.name: i for i in g.input}
    present = [n for n in PROMPT_INPUTS if n in inputs]
    if not present:
        return [Finding(name, "prompt-axis", f"no {' or '.join(PROMPT_INPUTS)} input: not a prompts graph")]
    first = {}
    for n in present:
        dims = inputs[n].type.tensor_type.shape.dim
        if not len(dims):
            return [Finding(name, "prompt-axis", f"input {n!r} has no shape; TensorRT needs its rank")]
        first[n] = dims[0]
    fixed = {n: d.dim_value for n, d in first.items() if d.HasField("dim_value")}
    if fixed:
        sizes = ", ".join(f"{n} axis 0 = {v}" for n, v in fixed.items())
        return [Finding(name, "prompt-axis", f"the prompt count is fixed ({sizes}): the engine would take only "
                                             "that many prompts; export with a dynamic prompt axis "
                                             "(samantic export bundle)")]
    axes = {d.dim_param for d in first.values()}
    if len(axes) != 1 or "" in axes:
        return [Finding(name, "prompt-axis", f"{', '.join(present)} do not share one named prompt axis "
                                             f"(got {sorted(axes)}); TensorRT needs one profile entry for it")]
    axis = axes.pop()
    findings: List[Finding] = []
    try:
        outs = _first_dims_inferred(model)
    except Exception as e:  # onnx's inference has gaps; the declared axes were checked above
        outs = {}
        findings.append(Finding(name, "prompt-axis", f"shape inference failed, outputs not checked ({e})", "warning"))
    baked = {o: v for o, v in outs.items() if isinstance(v, int)}
    if baked:
        sizes = ", ".join(f"{o} = {v}" for o, v in baked.items())
        findings.append(Finding(name, "prompt-axis", f"inputs have a dynamic prompt axis {axis!r} but the graph fixes "
                                                     f"axis 0 of its outputs ({sizes}): a reshape or constant bakes in "
                                                     "the export's sample batch"))
        return findings
    profile = profiles.get(axis)
    if profile is not None and profile["min"] == profile["max"]:
        findings.append(Finding(name, "prompt-axis", f"the profile of {axis!r} allows {profile['min']} prompts only",
                                "warning"))
    where = f"; profile min {profile['min']}, opt {profile['opt']}, max {profile['max']}" if profile else ""
    follow = f" -> {', '.join(outs)} axis 0" if outs else ""
    findings.append(Finding(name, "prompt-axis", f"prompt axis {axis!r} is dynamic: {', '.join(present)} axis 0"
                                                 f"{follow}{where}", "info"))
    return findings


def _shape_tensor_note(model, name: str) -> Finding:
    import onnx

    types = {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in model.graph.input}
    uses = shape_tensor_inputs(model)
    if not uses:
        text = "no graph input is a shape tensor (shapes are computed inside the engine)"
    else:
        text = "; ".join(f"{n} ({types.get(n, '?')}) feeds {', '.join(u)}" for n, u in uses.items())
        text = f"shape-tensor inputs: {text}; TensorRT needs them INT32"
    return Finding(name, "shape-tensor", text, "info")


def _fp16_note(model, name: str) -> Finding:
    keep = fp32_nodes(model.graph)
    if not keep:
        return Finding(name, "fp16-fp32", "no LayerNorm, softmax or normalization statistics: every layer may run "
                                          "in fp16", "info")
    ops: Dict[str, int] = {}
    for node in model.graph.node:
        if _node_name(node) in keep:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    counts = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return Finding(name, "fp16-fp32", f"fp16 engines keep {len(keep)} ops in FP32: {counts}", "info")


def check_trt(bundle: Union[str, Path, Bundle], precisions: Sequence[str] = ("fp32",)) -> List[Finding]:
    """Inspects a bundle's ONNX graphs (those TensorRT builds from) for TensorRT blockers, on the CPU.

    Besides blockers (errors, warnings) the result holds what was found, with
    severity ``"info"``: the prompts graph's prompt axis, the shape-tensor inputs
    of the dynamic graphs and the ops that fp16 engines keep in FP32.
    """
    import onnx

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    findings: List[Finding] = []
    for g, per in bundle.manifest["graphs"].items():
        for precision in precisions:
            if precision not in per:
                continue
            label = g if precision == "fp32" else f"{g} ({precision})"
            model = onnx.load(str(bundle.graph(g, precision)), load_external_data=False)
            findings.extend(check_graph(model, label, bundle.profiles))
            if precision != "fp32":
                continue
            if g == "prompts":
                findings.extend(check_prompt_axis(model, label, bundle.profiles))
            if any(not d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim):
                findings.append(_shape_tensor_note(model, label))
            findings.append(_fp16_note(model, label))
    return findings


# --- fp16: the layers kept in FP32 ----------------------------------------------------------------


def _node_name(node) -> str:
    """The node's name, or the one TensorRT's ONNX parser gives an unnamed node."""
    return node.name or f"node_of_{node.output[0]}"


def fp32_nodes(graph) -> Dict[str, str]:
    """The ONNX nodes an fp16 engine keeps in FP32, by name, with the reason.

    LayerNorm, GroupNorm, InstanceNorm and softmax nodes; reductions that feed one
    through element-wise ops; and decomposed normalizations, where a reduction of
    ``x`` comes back to an element-wise op on ``x`` (SAM's ``LayerNorm2d``:
    ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``, a hand-written softmax's
    max and sum), with the element-wise ops in between.

    Args:
        graph: an ``onnx.GraphProto`` (its top level).

    Returns:
        ``{node name: reason}``; unnamed nodes are keyed as TensorRT's parser names them.
    """
    nodes = list(graph.node)
    producer = {t: n for n in nodes for t in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    constants = {i.name for i in graph.initializer} | {t for n in nodes if n.op_type == "Constant" for t in n.output}
    keep: Dict[str, str] = {_node_name(n): FP32_OPS[n.op_type] for n in nodes if n.op_type in FP32_OPS}

    def near_ancestors(tensor: str, hops: int = 2) -> set:
        """``tensor`` and what it was computed from element-wise, constants aside."""
        found, frontier = {tensor}, [tensor]
        for _ in range(hops):
            nxt = []
            for t in frontier:
                p = producer.get(t)
                if p is not None and p.op_type in PASS_OPS:
                    nxt.extend(i for i in p.input if i and i not in found and i not in constants)
            found.update(nxt)
            frontier = nxt
        return found

    for r in nodes:
        if r.op_type not in REDUCE_OPS or not r.input:
            continue
        source = near_ancestors(r.input[0])
        # forward through element-wise ops, remembering the path, to the op that uses the statistic
        parent: Dict[str, Any] = {_node_name(r): None}
        frontier = [(r, 0)]
        while frontier:
            node, depth = frontier.pop()
            for c in (c for t in node.output for c in consumers.get(t, [])):
                cname = _node_name(c)
                if cname in parent or depth >= 8:
                    continue
                parent[cname] = node
                on_path = set(node.output)
                target = None
                if c.op_type in FP32_OPS:
                    target = f"{r.op_type} feeding {FP32_OPS[c.op_type]}"
                elif c.op_type in ("Sub", "Div", "Mul") and any(i in source for i in c.input if i not in on_path):
                    target = f"{r.op_type} of a normalization"
                if target is not None:
                    step: Any = c
                    while step is not None:
                        keep.setdefault(_node_name(step), target)
                        step = parent[_node_name(step)]
                elif c.op_type in PASS_OPS:
                    frontier.append((c, depth + 1))
    # element-wise ops between two kept nodes (the square before a variance, the exp of a softmax)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            name = _node_name(n)
            if name in keep or n.op_type not in PASS_OPS:
                continue
            fed = [producer[i] for i in n.input if i in producer and i not in constants]
            if fed and all(_node_name(p) in keep for p in fed) and \
                    any(_node_name(c) in keep for t in n.output for c in consumers.get(t, [])):
                keep[name] = keep[_node_name(fed[0])]
                changed = True
    return keep


def onnx_nodes_of_layer(layer_name: str, metadata: str = "") -> List[str]:
    """The ONNX nodes a TensorRT layer came from: its ``[ONNX Layer: ...]`` metadata, else its name."""
    return re.findall(r"\[ONNX Layer: ([^\]\x1e\x1f]+)\]", metadata or "") or [layer_name]


def fp32_layer_reason(layer_name: str, layer_type: str, fp32_ops: Mapping[str, str],
                      metadata: str = "") -> Optional[str]:
    """Why an fp16 engine keeps this TensorRT layer in FP32, or None.

    Args:
        layer_name: ``layer.name`` (the parser names a node's main layer after the node).
        layer_type: ``str(layer.type)``: ``"LayerType.SOFTMAX"`` or ``"SOFTMAX"``.
        fp32_ops: :func:`fp32_nodes` of the graph the network was parsed from.
        metadata: ``layer.metadata`` (``"[ONNX Layer: <node>]"``, TensorRT >= 10).
    """
    kind = layer_type.rsplit(".", 1)[-1].upper()
    if kind not in FLOAT_LAYER_TYPES:
        return None
    if kind == "NORMALIZATION":
        return "normalization layer"
    if kind == "SOFTMAX":
        return "softmax layer"
    for node in onnx_nodes_of_layer(layer_name, metadata):
        if node in fp32_ops:
            return fp32_ops[node]
    return None


def _keep_fp32_layers(trt, network, fp32_ops: Mapping[str, str]) -> int:
    """TensorRT 10 (weakly typed): FP32 precision and outputs on the chosen layers; the caller sets
    ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` so the builder may not override them."""
    kept = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if fp32_layer_reason(layer.name, str(layer.type), fp32_ops, getattr(layer, "metadata", "")) is None:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        kept += 1
    return kept


# --- building -------------------------------------------------------------------------------------


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _fp16_graph(src: Path, dst: Path) -> Path:
    """The graph in fp16 with float32 inputs/outputs (TensorRT 11: precision lives in the graph), except
    :func:`fp32_nodes`, which stay FP32 behind casts."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    for node in model.graph.node:
        node.name = _node_name(node)  # the converter's block list goes by name
    keep = sorted(fp32_nodes(model.graph))
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _topological_sort(model.graph)  # the converter appends its input casts last; parsers need producer order
    onnx.save(model, str(dst))
    return dst


def _topological_sort(graph) -> None:
    """Reorders ``graph.node`` so every node comes after the producers of its inputs (stable)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


class _Calibrator:
    """INT8 entropy calibration of the image encoder on sample images (TensorRT 10)."""

    def __new__(cls, trt, cudart, batches: List[np.ndarray], cache_path: Optional[Path]):
        base = trt.IInt8EntropyCalibrator2

        class Calibrator(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.batches = list(batches)
                self.cache_path = cache_path
                self.ptr = 0
                nbytes = max(b.nbytes for b in self.batches)
                err, self.ptr = cudart.cudaMalloc(nbytes)
                if int(err) != 0:
                    raise RuntimeError(f"cudaMalloc for calibration failed: {err}")

            def get_batch_size(self) -> int:
                return 1

            def get_batch(self, names):
                if not self.batches:
                    return None
                b = np.ascontiguousarray(self.batches.pop(0), np.float32)
                cudart.cudaMemcpy(self.ptr, b.ctypes.data, b.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
                return [int(self.ptr)]

            def read_calibration_cache(self):
                if self.cache_path is not None and self.cache_path.is_file():
                    return self.cache_path.read_bytes()
                return None

            def write_calibration_cache(self, cache) -> None:
                if self.cache_path is not None:
                    self.cache_path.write_bytes(bytes(cache))

        return Calibrator()


def calibration_batches(bundle: Bundle, images: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Encoder inputs ``[1, 3, S, S]`` of sample RGB images, preprocessed exactly as the runtime does."""
    from samantic.pipeline.transforms import preprocess

    if not images:
        raise ValueError("INT8 calibration needs sample images (--calib-images)")
    return [preprocess(im, bundle.pixel_mean, bundle.pixel_std, bundle.img_size)[0] for im in images]


def build_engines(
    bundle_path: Union[str, Path],
    precision: str = "fp16",
    *,
    timing_cache: Optional[Union[str, Path]] = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    calib_images: Sequence[np.ndarray] = (),
    device: int = 0,
    force: bool = False,
) -> Dict[str, Any]:
    """Builds the bundle's TensorRT engines for this GPU, TensorRT version and precision.

    Args:
        bundle_path: the bundle directory (updated in place: engines + manifest).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        timing_cache: file to read the builder's timing cache from and write it back to.
        workspace_mb: builder workspace limit.
        calib_images: RGB uint8 images for INT8 calibration (TensorRT 10).
        device: CUDA device index.
        force: rebuild even if engines for this key exist.

    Returns:
        The manifest's engine entry (with ``key``).

    Raises:
        ImportError: TensorRT (or cuda-python) is not installed.
        RuntimeError: no GPU; the parser or builder failed (its errors are quoted).
        ValueError: bad precision; INT8 without calibration images / Q/DQ graph.
    """
    from samantic.export.bundle import write_manifest

    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}")
    trt = import_tensorrt()
    gpu = gpu_info(device)
    bundle = Bundle.load(bundle_path)
    key = engine_key(gpu, trt.__version__, precision)
    existing = bundle.manifest.get("engines", {}).get(key)
    if existing is not None and not force:
        return {"key": key, **existing}
    major = trt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    files: Dict[str, str] = {}
    fp32_layers: Dict[str, int] = {}  # TensorRT 10: layers constrained to FP32, per graph
    cudart = import_cudart() if precision == "int8" and major < 11 else None
    with tempfile.TemporaryDirectory() as tmp:
        for g in GRAPHS:
            per = bundle.manifest["graphs"][g]
            src = bundle.graph(g, "fp32")
            strongly_typed = major >= 11
            if major >= 11 and precision == "fp16":
                src = _fp16_graph(src, Path(tmp) / f"{g}.fp16.onnx")
            elif major >= 11 and precision == "int8":
                if "int8-qdq" not in per:
                    if g == "encoder":
                        raise ValueError("TensorRT >= 11 has no implicit INT8 quantization: the encoder needs a Q/DQ "
                                         "graph (e.g. NVIDIA ModelOpt) stored as its 'int8-qdq' version; or use fp16")
                    src = _fp16_graph(src, Path(tmp) / f"{g}.fp16.onnx")
                else:
                    src = bundle.graph(g, "int8-qdq")
            builder = trt.Builder(logger)
            flags = 0
            if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
                flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10+
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(src)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"TensorRT could not parse {src.name}: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, ignore_mismatch=False)
            if major < 11 and precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)  # int8: decoder graphs run fp16, the encoder INT8 + fp16 fallback
                import onnx

                keep = fp32_nodes(onnx.load(str(src), load_external_data=False).graph)
                fp32_layers[g] = _keep_fp32_layers(trt, network, keep)
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            if major < 11 and precision == "int8" and g == "encoder":
                config.set_flag(trt.BuilderFlag.INT8)
                batches = calibration_batches(bundle, calib_images)
                config.int8_calibrator = _Calibrator(trt, cudart, batches, Path(tmp) / "calib.cache")
            if g != "encoder":
                profile = builder.create_optimization_profile()
                mins, opts, maxs = (graph_input_shapes(bundle.manifest, g, lv) for lv in ("min", "opt", "max"))
                for name in mins:
                    profile.set_shape(name, mins[name], opts[name], maxs[name])
                config.add_optimization_profile(profile)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise RuntimeError(f"TensorRT failed to build the {g} engine ({precision}); see the log above")
            cache_bytes = bytes(config.get_timing_cache().serialize())
            rel = f"engines/{key}/{g}.plan"
            from samantic.io.atomic import atomic_write_bytes

            atomic_write_bytes(bundle.root / rel, bytes(blob))
            files[g] = rel
    if timing_cache:
        from samantic.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(timing_cache), cache_bytes)
    entry = {"gpu": gpu["name"], "sm": gpu["sm"], "tensorrt": str(trt.__version__), "precision": precision,
             "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files}
    if fp32_layers:
        entry["fp32_layers"] = fp32_layers
    manifest = dict(bundle.manifest)
    manifest["engines"] = {**manifest.get("engines", {}), key: entry}
    write_manifest(bundle.root, manifest)
    return {"key": key, **entry}


__all__ = ["Finding", "build_engines", "check_graph", "check_prompt_axis", "check_trt", "fp32_layer_reason",
           "fp32_nodes", "onnx_nodes_of_layer", "shape_tensor_inputs"]
