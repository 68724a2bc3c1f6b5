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
- int8: TensorRT 10 calibrates the image encoder (``IInt8EntropyCalibrator2``) on
  sample images (preprocessed like the runtime does); the prompt and upscale
  engines are built fp16, whose inputs are not images. TensorRT 11 removed implicit
  quantization: INT8 needs Q/DQ nodes in the ONNX graph (e.g. from NVIDIA
  ModelOpt); a bundle may carry them as an ``int8-qdq`` version of a graph, which is
  then parsed as is. Without one, the build stops with that explanation.

Only :func:`check_trt` and the missing-TensorRT / missing-GPU errors run on a
machine without a GPU; the build paths are written against the documented API.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

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


@dataclass
class Finding:
    """One TensorRT blocker (or warning) in a graph."""

    graph: str
    kind: str  # "unsupported-op", "io-type", "shape-tensor", "dynamic-dim"
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


def check_trt(bundle: Union[str, Path, Bundle], precisions: Sequence[str] = ("fp32",)) -> List[Finding]:
    """Inspects a bundle's ONNX graphs (those TensorRT builds from) for TensorRT blockers, on the CPU."""
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
    return findings


# --- building -------------------------------------------------------------------------------------


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _fp16_graph(src: Path, dst: Path) -> Path:
    """The graph in fp16 with float32 inputs/outputs (TensorRT 11: precision lives in the graph)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
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
    manifest = dict(bundle.manifest)
    manifest["engines"] = {**manifest.get("engines", {}), key: entry}
    write_manifest(bundle.root, manifest)
    return {"key": key, **entry}


__all__ = ["Finding", "build_engines", "check_graph", "check_trt"]
