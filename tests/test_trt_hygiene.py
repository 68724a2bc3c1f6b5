"""TensorRT hygiene: fp16 engines keep LayerNorm/softmax in FP32, the prompts graph's dynamic prompt axis,
and ``samantic export check-trt`` saying what it found.

TensorRT is not installed here and there is no GPU: the selection of FP32 nodes and
layers is pure and tested directly; the TensorRT 10 and 11 build paths run against a
fake ``tensorrt`` module that records what the build asked of it (the TensorRT 11 fake
has no precision builder flags, as TensorRT 11 removed them).
"""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from samantic.export.tensorrt import (check_prompt_axis, check_trt, fp32_layer_reason, fp32_nodes,
                                      onnx_nodes_of_layer)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from samantic.export.bundle import export_bundle

    return export_bundle("sam_nano", tmp_path_factory.mktemp("trt") / "nano", int8=False)  # the shipped weights


# --- which ONNX nodes stay FP32 -------------------------------------------------------------------


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _graph(nodes, inits=(), inputs=("x",), outputs=("y",)):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 8, 4, 4]) for n in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    return helper.make_graph(nodes, "g", ins, outs, initializer=list(inits))


def test_layernorm_and_softmax_nodes_stay_fp32():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("LayerNormalization", ["h", "s", "b"], ["n"], name="ln", axis=-1),
             helper.make_node("Softmax", ["n"], ["y"], name="sm", axis=-1)]
    keep = fp32_nodes(_graph(nodes, [_const("w", np.eye(4)), _const("s", np.ones(4)), _const("b", np.zeros(4))]))
    assert keep == {"ln": "LayerNorm", "sm": "softmax"}


def test_decomposed_layernorm_keeps_its_statistics_not_its_affine():
    """SAM's LayerNorm2d as torch exports it: (x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["u"], name="mean", axes=[1]),
             helper.make_node("Sub", ["x", "u"], ["d"], name="sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
             helper.make_node("ReduceMean", ["d2"], ["var"], name="var", axes=[1]),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
             helper.make_node("Div", ["d", "std"], ["xn"], name="div"),
             helper.make_node("Mul", ["xn", "w"], ["xw"], name="scale"),
             helper.make_node("Add", ["xw", "b"], ["y"], name="shift")]
    inits = [_const("two", 2.0), _const("eps", 1e-6), _const("w", np.ones((8, 1, 1))), _const("b", np.zeros((8, 1, 1)))]
    keep = fp32_nodes(_graph(nodes, inits))
    assert set(keep) == {"mean", "sub", "pow", "var", "add_eps", "sqrt", "div"}
    assert all("normalization" in r for r in keep.values())


def test_hand_written_softmax_is_kept_and_other_reductions_are_not():
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], name="max", axes=[-1]),
             helper.make_node("Sub", ["x", "m"], ["s"], name="shift"),
             helper.make_node("Exp", ["s"], ["e"], name="exp"),
             helper.make_node("ReduceSum", ["e"], ["z"], name="sum", axes=[-1]),
             helper.make_node("Div", ["e", "z"], ["p"], name="div"),
             # a pooled feature into a matmul (squeeze-excite like), scaled by a constant: no normalization
             helper.make_node("ReduceMean", ["x2"], ["pool"], name="pool", axes=[2, 3]),
             helper.make_node("Mul", ["pool", "two"], ["pool2"], name="pool_scale"),
             helper.make_node("MatMul", ["pool2", "w"], ["y"], name="fc"),
             # an unnamed LayerNorm: keyed as TensorRT's parser names it
             helper.make_node("LayerNormalization", ["p", "s1", "b1"], ["y2"], axis=-1)]
    inits = [_const("two", 2.0), _const("w", np.eye(4)), _const("s1", np.ones(4)), _const("b1", np.zeros(4))]
    keep = fp32_nodes(_graph(nodes, inits, inputs=("x", "x2"), outputs=("y", "y2")))
    assert set(keep) == {"max", "shift", "exp", "sum", "div", "node_of_y2"}


def test_fp32_layer_reason_is_by_type_metadata_and_exact_name():
    keep = {"/neck/ReduceMean": "ReduceMean of a normalization", "/a/Add": "ReduceMean of a normalization"}
    assert fp32_layer_reason("/norm1/LayerNormalization", "LayerType.NORMALIZATION", {}) == "normalization layer"
    assert fp32_layer_reason("anything", "SOFTMAX", {}) == "softmax layer"
    assert fp32_layer_reason("/neck/ReduceMean", "LayerType.REDUCE", keep) == keep["/neck/ReduceMean"]
    # a helper layer the parser made for the node: found through its metadata, fused or not
    assert fp32_layer_reason("ONNXTRT_Broadcast_12", "LayerType.ELEMENTWISE", keep,
                             "[ONNX Layer: /neck/ReduceMean]") is not None
    assert onnx_nodes_of_layer("x", "[ONNX Layer: /a/Mul]\x1f[ONNX Layer: /a/Add]") == ["/a/Mul", "/a/Add"]
    assert fp32_layer_reason("fused", "ELEMENTWISE", keep, "[ONNX Layer: /a/Mul]\x1f[ONNX Layer: /a/Add]") is not None
    # torch names the second Add of a scope "/a/Add_1": a different node, not a prefix match
    assert fp32_layer_reason("/a/Add_1", "LayerType.ELEMENTWISE", keep) is None
    # shape, constant and data-movement layers of a kept node are left to the builder
    for kind in ("LayerType.SHAPE", "LayerType.CONSTANT", "LayerType.SHUFFLE", "LayerType.CAST"):
        assert fp32_layer_reason("/neck/ReduceMean", kind, keep) is None
    assert fp32_layer_reason("/fc/MatMul", "LayerType.MATRIX_MULTIPLY", keep) is None


# --- the build paths against fake TensorRT 10 and 11 ----------------------------------------------

LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Shape": "SHAPE", "Constant": "CONSTANT",
               "MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "Sqrt": "UNARY",
               "Exp": "UNARY", "Erf": "UNARY", "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE",
               "Div": "ELEMENTWISE", "Pow": "ELEMENTWISE", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE"}


class FakeLayer:
    def __init__(self, name, kind, metadata, dtype):
        self.name, self.type, self.metadata = name, f"LayerType.{kind}", metadata
        self.precision = None
        self.outputs = [types.SimpleNamespace(dtype=dtype)]
        self.output_types = {}

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


def fake_tensorrt(version, record):
    """A ``tensorrt`` module whose parser turns each ONNX node into a layer (plus a helper layer per LayerNorm,
    named differently, as the real parser makes); TensorRT 11 has no precision builder flags."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    flags = {"FP16": "FP16", "INT8": "INT8", "OBEY_PRECISION_CONSTRAINTS": "OBEY"} if version.startswith("10.") else {}
    trt.BuilderFlag = types.SimpleNamespace(**flags)

    class Network:
        def __init__(self, flags):
            self.flags, self.layers = flags, []
            record.setdefault("networks", []).append(self)

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path)
            self.network.model = model
            for node in model.graph.node:
                meta = f"[ONNX Layer: {node.name}]"
                dtype = "int64" if node.op_type == "Shape" else "float32"
                kind = LAYER_TYPES.get(node.op_type, "SHUFFLE")
                self.network.layers.append(FakeLayer(node.name, kind, meta, dtype))
                if node.op_type == "LayerNormalization":
                    self.network.layers.append(FakeLayer(f"ONNXTRT_helper_{node.name}", "ELEMENTWISE", meta, dtype))
            return True

    class Config:
        def __init__(self):
            self.flags = []
            record.setdefault("configs", []).append(self)

        def set_memory_pool_limit(self, pool, size):
            pass

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch=False):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            return b"plan"

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(version):
        record = {}
        runtime = types.ModuleType("cuda.bindings.runtime")
        runtime.cudaGetDeviceCount = lambda: (0, 1)
        props = types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0)
        runtime.cudaGetDeviceProperties = lambda device: (0, props)
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = runtime
        cuda = types.ModuleType("cuda")
        cuda.bindings = bindings
        mods = {"tensorrt": fake_tensorrt(version, record), "cuda": cuda, "cuda.bindings": bindings,
                "cuda.bindings.runtime": runtime}
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        return record
    return install


def _copy(bundle_dir, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def test_trt10_fp16_constrains_the_chosen_layers(bundle_dir, tmp_path, fake_gpu):
    from samantic.export.tensorrt import build_engines

    record = fake_gpu("10.3.0")
    entry = build_engines(_copy(bundle_dir, tmp_path), "fp16")
    assert entry["key"] == "fake-gpu-sm90/trt10.3.0/fp16"
    for config in record["configs"]:
        assert config.flags == ["FP16", "OBEY"]
    for graph, network in zip(("encoder", "prompts", "upscale"), record["networks"]):
        keep = fp32_nodes(network.model.graph)
        assert network.flags == 0  # weakly typed
        constrained = [l for l in network.layers if l.precision == "float32"]
        expected = [l for l in network.layers if l.type in ("LayerType.NORMALIZATION", "LayerType.SOFTMAX")
                    or (l.metadata[len("[ONNX Layer: "):-1] in keep and l.type in
                        ("LayerType.REDUCE", "LayerType.ELEMENTWISE", "LayerType.UNARY"))]
        assert constrained == expected and entry["fp32_layers"][graph] == len(expected)
        assert all(l.output_types == {0: "float32"} for l in constrained)
        assert all(l.precision is None and not l.output_types for l in network.layers if l not in constrained)
        ln = [l for l in network.layers if l.name.startswith("ONNXTRT_helper_")]
        assert all(l in constrained for l in ln)  # found through metadata
    assert entry["fp32_layers"]["encoder"] > 0 and entry["fp32_layers"]["prompts"] > 0
    assert entry["fp32_layers"]["upscale"] == 7  # the decomposed LayerNorm2d of the output upscaling


def test_trt11_fp16_graph_has_fp32_islands(bundle_dir, tmp_path, fake_gpu):
    from samantic.export.tensorrt import build_engines

    record = fake_gpu("11.1.0")  # no BuilderFlag.FP16 / OBEY_PRECISION_CONSTRAINTS: using them would raise
    build_engines(_copy(bundle_dir, tmp_path), "fp16")
    assert all(config.flags == [] for config in record["configs"])
    for graph, network in zip(("encoder", "prompts", "upscale"), record["networks"]):
        assert network.flags == 1 << 5  # STRONGLY_TYPED
        assert all(l.precision is None for l in network.layers)  # precision lives in the graph
        model = onnx.shape_inference.infer_shapes(network.model)
        dtype = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
        dtype.update({i.name: i.data_type for i in model.graph.initializer})
        original = onnx.load(str(tmp_path / "bundle" / f"{graph}.onnx"))
        keep = fp32_nodes(original.graph)
        kept = [n for n in model.graph.node if n.name in keep]
        assert len(kept) == len(keep)
        for node in kept:  # every float tensor in and out of a kept node is FLOAT
            tensors = [t for t in [*node.input, *node.output] if t and dtype.get(t) in (TensorProto.FLOAT,
                                                                                      TensorProto.FLOAT16)]
            assert tensors and all(dtype[t] == TensorProto.FLOAT for t in tensors), (graph, node.name)
        heavy = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm") and n.input[0] in dtype]
        assert heavy and all(dtype[n.input[0]] == TensorProto.FLOAT16 for n in heavy)  # the rest runs in fp16


# --- the prompt axis and check-trt ----------------------------------------------------------------


def _prompts(bundle_dir):
    return onnx.load(str(Path(bundle_dir) / "prompts.onnx"))


def test_check_trt_finds_the_prompt_axis_and_fp32_ops(bundle_dir):
    findings = check_trt(bundle_dir)
    assert [f for f in findings if f.severity != "info"] == []
    text = {(f.graph, f.kind): f.message for f in findings}
    axis = text[("prompts", "prompt-axis")]
    assert "'B' is dynamic: point_coords, point_labels axis 0 -> iou_predictions, mask_tokens, src" in axis
    assert "min 1, opt 64, max 128" in axis
    assert "no graph input is a shape tensor" in text[("prompts", "shape-tensor")]
    assert "LayerNormalization x9, Softmax x7" in text[("prompts", "fp16-fp32")]
    assert "LayerNormalization x4" in text[("encoder", "fp16-fp32")] and "Softmax x2" in text[("encoder", "fp16-fp32")]
    assert "ReduceMean x2" in text[("upscale", "fp16-fp32")]


def test_fixed_or_baked_prompt_counts_are_errors(bundle_dir):
    profiles = {"B": {"min": 1, "opt": 64, "max": 128}, "N": {"min": 1, "opt": 2, "max": 8}}
    fixed = _prompts(bundle_dir)
    for vi in fixed.graph.input:
        if vi.name in ("point_coords", "point_labels"):
            vi.type.tensor_type.shape.dim[0].dim_value = 3
    (f,) = check_prompt_axis(fixed, "prompts", profiles)
    assert f.severity == "error" and "prompt count is fixed (point_coords axis 0 = 3" in f.message

    split = _prompts(bundle_dir)
    split.graph.input[2].type.tensor_type.shape.dim[0].dim_param = "P"
    (f,) = check_prompt_axis(split, "prompts", profiles)
    assert f.severity == "error" and "do not share one named prompt axis" in f.message

    # declared dynamic, but the graph reshapes to the export's sample batch of 3
    x = helper.make_tensor_value_info("point_coords", TensorProto.FLOAT, ["B", "N", 2])
    lab = helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, ["B", "N"])
    out = helper.make_tensor_value_info("iou_predictions", TensorProto.FLOAT, ["B", None])
    shape = numpy_helper.from_array(np.array([3, -1], np.int64), "shape")
    baked = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["point_coords", "shape"],
                                                                  ["iou_predictions"])],
                                                "g", [x, lab], [out], initializer=[shape]))
    (f,) = check_prompt_axis(baked, "prompts", profiles)
    assert f.severity == "error" and "iou_predictions = 3" in f.message and "bakes in" in f.message

    one = check_prompt_axis(_prompts(bundle_dir), "prompts", {"B": {"min": 8, "opt": 8, "max": 8}})
    assert [g.severity for g in one] == ["warning", "info"] and "allows 8 prompts only" in one[0].message


def test_cli_check_trt_says_what_it_found(bundle_dir):
    exe = Path(sys.executable).with_name("samantic")
    proc = subprocess.run([str(exe), "export", "check-trt", str(bundle_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "prompts: prompt axis 'B' is dynamic" in out
    assert "prompts: fp16 engines keep 16 ops in FP32: LayerNormalization x9, Softmax x7" in out
    assert "no TensorRT blockers found" in out
