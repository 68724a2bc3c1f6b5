"""The TensorRT engine: a bundle's serialized engines behind :class:`~samantic.pipeline.engine.Engine`.

Written against the TensorRT 10 Python API (JetPack 6) and TensorRT 11, with
device memory through cuda-python (no torch). Engines are built offline by
``samantic export trt`` and stored in the bundle under a key made of the GPU
name and compute capability, the TensorRT version and the precision; an engine
built for another GPU or TensorRT version is not used (rebuild it).

Not run in samantic's CI (no GPU there): only the no-TensorRT / no-GPU
paths are tested.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from samantic.pipeline.engine import PromptOutputs, point_prompts, upscale_indices
from samantic.runtime.bundle import Bundle, BundleEngine, BundleError

GRAPH_NAMES = ("encoder", "prompts", "upscale")


def import_tensorrt():
    """``tensorrt``, or an ImportError that names the extra."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError("TensorRT needs: pip install 'samantic[trt]' (on Jetson: the JetPack python3-libnvinfer)") from e
    return tensorrt


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise ImportError("TensorRT needs cuda-python for device memory: pip install 'samantic[trt]'") from e
    return cudart


def cuda_check(result: Tuple, what: str) -> Any:
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return result[1] if len(result) == 2 else result[1:]


def gpu_info(device: int = 0) -> Dict[str, Any]:
    """Name and compute capability of a CUDA device.

    Raises:
        RuntimeError: no CUDA device (the message says so plainly).
        ImportError: cuda-python missing.
    """
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise RuntimeError(f"TensorRT needs a CUDA GPU; none is usable here (cudaGetDeviceCount: {err}, {count} devices)")
    if device >= count:
        raise RuntimeError(f"CUDA device {device} does not exist ({count} devices)")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "sm": f"{props.major}{props.minor}"}


def engine_key(gpu: Dict[str, Any], trt_version: str, precision: str) -> str:
    """``<gpu-slug>-sm<cc>/trt<version>/<precision>``: where engines for this combination live."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return f"{slug}-sm{gpu['sm']}/trt{trt_version}/{precision}"


def current_key(precision: str, device: int = 0) -> str:
    trt = import_tensorrt()
    return engine_key(gpu_info(device), trt.__version__, precision)


def find_engine(bundle: Bundle, precision: str, device: int = 0, quiet: bool = False) -> Optional[Dict[str, Any]]:
    """The bundle's engine entry for this GPU, TensorRT version and precision, or None.

    Args:
        quiet: return None (instead of raising) when TensorRT or a GPU is missing.

    Raises:
        ImportError, RuntimeError: TensorRT or a GPU is missing and ``quiet`` is False.
    """
    try:
        key = current_key(precision, device)
    except (ImportError, RuntimeError):
        if quiet:
            return None
        raise
    entry = bundle.manifest.get("engines", {}).get(key)
    return None if entry is None else {"key": key, **entry}


class _DeviceBuffer:
    """One cudaMalloc'd buffer, grown on demand."""

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(cuda_check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0


class TensorRTEngine(BundleEngine):
    """Runs a bundle's TensorRT engines (encoder, prompts, upscale) on one CUDA device.

    Intermediate tensors (image embedding, ``src``, mask tokens) stay in device
    buffers between the three engines; host copies are the image in, IoU and
    class logits out, and the selected masks' low-res logits out.

    Args:
        bundle: a loaded bundle holding engines for this GPU / TensorRT / precision.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        device: ``"auto"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ImportError: TensorRT or cuda-python missing.
        RuntimeError: no GPU.
        BundleError: no engine for this combination (build it with ``samantic export trt``).
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "fp16", device: str = "auto") -> None:
        from samantic.runtime.onnxruntime import parse_device

        kind, index = parse_device(device)
        if kind == "cpu":
            raise ValueError("the TensorRT backend runs on a CUDA device, not 'cpu'")
        trt = import_tensorrt()
        self.cudart = import_cudart()
        entry = find_engine(bundle, precision, index)
        if entry is None:
            raise BundleError(f"{bundle.root}: no TensorRT engine for {current_key(precision, index)}; build it with "
                              f"`samantic export trt {bundle.root} --precision {precision}`")
        cuda_check(self.cudart.cudaSetDevice(index), "cudaSetDevice")
        super().__init__(bundle)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for g in GRAPH_NAMES:
            blob = bundle.path(entry["files"][g]).read_bytes()
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise BundleError(f"{bundle.root}: TensorRT could not deserialize {entry['files'][g]!r} "
                                  "(built by another TensorRT version or for another GPU?)")
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()
        self.stream = cuda_check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: Dict[str, _DeviceBuffer] = {}
        self.has_head = "class_logits" in self._names("prompts", output=True)
        self._set_tasks(self._names("prompts", output=False))

    def _names(self, graph: str, output: bool):
        engine = self.engines[graph]
        mode = self.trt.TensorIOMode.OUTPUT if output else self.trt.TensorIOMode.INPUT
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [n for n in names if engine.get_tensor_mode(n) == mode]

    def _buffer(self, name: str, nbytes: int) -> int:
        return self.buffers.setdefault(name, _DeviceBuffer(self.cudart)).ensure(nbytes)

    def _execute(self, graph: str, host_inputs: Dict[str, np.ndarray], device_inputs: Dict[str, Tuple[str, Tuple[int, ...]]],
                 host_outputs: Tuple[str, ...]) -> Dict[str, Any]:
        """Runs one engine; device inputs are (buffer name, shape); every output lands in a buffer named
        ``<graph>.<output>``, and those in ``host_outputs`` are also copied to the host."""
        cudart, trt = self.cudart, self.trt
        engine, ctx = self.engines[graph], self.contexts[graph]
        kind = cudart.cudaMemcpyKind
        for name, arr in host_inputs.items():
            arr = np.ascontiguousarray(arr, dtype=trt.nptype(engine.get_tensor_dtype(name)))
            ptr = self._buffer(f"{graph}.{name}", arr.nbytes)
            cuda_check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind.cudaMemcpyHostToDevice, self.stream),
                       "cudaMemcpyAsync")
            ctx.set_input_shape(name, arr.shape)
            ctx.set_tensor_address(name, ptr)
        for name, (buf, shape) in device_inputs.items():
            ctx.set_input_shape(name, shape)
            ctx.set_tensor_address(name, self.buffers[buf].ptr)
        shapes = {}
        for name in self._names(graph, output=True):
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shapes[name] = (shape, dtype)
            ctx.set_tensor_address(name, self._buffer(f"{graph}.{name}", int(np.prod(shape)) * dtype.itemsize))
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine")
        out: Dict[str, Any] = {}
        for name in host_outputs:
            if name not in shapes:
                continue
            shape, dtype = shapes[name]
            host = np.empty(shape, dtype)
            cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[f"{graph}.{name}"].ptr, host.nbytes,
                                              kind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")
            out[name] = host
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out["_shapes"] = {k: v[0] for k, v in shapes.items()}
        return out

    def encode(self, x: np.ndarray) -> None:
        res = self._execute("encoder", {"image": x}, {}, ())
        self._embedding_shape = res["_shapes"]["image_embeddings"]

    def run_prompts(self, coords: np.ndarray, task: int = 0) -> PromptOutputs:
        pc, pl = point_prompts(coords)
        b = len(pc)
        limit = self.bundle.profiles.get("B", {}).get("max")
        if limit is not None and b > limit:
            raise ValueError(f"{b} prompts in one batch; the engines were built for at most {limit} (points_per_batch)")
        host = {"point_coords": pc, "point_labels": pl}
        task_in = self.task_feed(task)
        if task_in is not None:
            host["task"] = task_in
        res = self._execute("prompts", host,
                            {"image_embeddings": ("encoder.image_embeddings", self._embedding_shape)},
                            ("iou_predictions", "class_logits"))
        shapes = res["_shapes"]
        return PromptOutputs(np.asarray(res["iou_predictions"], np.float32), _DeviceTokens(self, shapes["mask_tokens"]),
                             res.get("class_logits"), state=(shapes["src"], shapes["mask_tokens"]))

    def upscale(self, out: PromptOutputs, prompt_idx: np.ndarray, mask_idx: np.ndarray) -> np.ndarray:
        if len(prompt_idx) == 0:
            return self.no_masks()
        src_shape, tok_shape = out.state
        host = upscale_indices(prompt_idx, mask_idx, self.multimask)
        res = self._execute("upscale", host, {"src": ("prompts.src", src_shape), "mask_tokens": ("prompts.mask_tokens", tok_shape)},
                            ("low_res_logits",))
        return np.asarray(res["low_res_logits"], np.float32)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        for b in self.buffers.values():
            b.free()
        self.buffers.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _DeviceTokens:
    """Mask tokens in the prompts engine's output buffer, copied to the host only when a scorer reads them."""

    def __init__(self, engine: TensorRTEngine, shape: Tuple[int, ...]) -> None:
        self.engine = engine
        self.shape = shape
        self._host: Optional[np.ndarray] = None

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._host is None:
            e = self.engine
            host = np.empty(self.shape, np.float32)
            cuda_check(e.cudart.cudaMemcpy(host.ctypes.data, e.buffers["prompts.mask_tokens"].ptr, host.nbytes,
                                           e.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")
            self._host = host
        return self._host[index]


__all__ = ["TensorRTEngine", "engine_key", "find_engine", "gpu_info", "import_tensorrt"]
