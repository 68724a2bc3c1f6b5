"""The onnxruntime engine: a bundle's three graphs behind :class:`~samantic.pipeline.engine.Engine` (torch-free).

Execution providers are taken in the order TensorRT EP, CUDA EP, CPU EP, among
those the installed onnxruntime has. On CUDA the sessions run with IO binding:
the image embedding, the transformer's ``src`` and the mask tokens stay on the
device between the encoder, prompt and upscale graphs; only IoU, class logits
and the selected masks' low-res logits come back to the host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from samantic.pipeline.engine import PromptOutputs, point_prompts, upscale_indices
from samantic.runtime.bundle import Bundle, BundleEngine, graph_input_shapes

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = PROVIDER_ORDER[:2]


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("the onnxruntime backend needs: pip install 'samantic[runtime]'") from e
    return onnxruntime


def parse_device(device: str) -> Tuple[str, int]:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (kind, index)."""
    if device in ("auto", "cpu", "cuda"):
        return device, 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def select_providers(device: str = "auto", available: Optional[Sequence[str]] = None,
                     trt_options: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Execution providers for ``device``, best first: TensorRT EP, CUDA EP, CPU EP (those installed).

    Raises:
        RuntimeError: ``device`` asks for CUDA and the installed onnxruntime has no GPU provider.
    """
    kind, index = parse_device(device)
    if available is None:
        available = import_onnxruntime().get_available_providers()
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if kind == "cuda" and not gpu:
        raise RuntimeError(f"device {device!r} needs onnxruntime's CUDA or TensorRT provider; "
                           f"this onnxruntime has {', '.join(available)} (pip install onnxruntime-gpu)")
    out: List[Any] = []
    for p in gpu:
        opts: Dict[str, Any] = {"device_id": index}
        if p == "TensorrtExecutionProvider":
            opts.update(trt_options or {})
        out.append((p, opts))
    return out + ["CPUExecutionProvider"]


def trt_ep_options(bundle: Bundle, graph: str, precision: str, cache_dir: Optional[Path] = None) -> Dict[str, Any]:
    """TensorRT EP options of one graph: engine cache outside the bundle, FP16, profiles from the manifest."""
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samantic" / "trt_ep"
    opts: Dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache / bundle.model_id),
                            "trt_timing_cache_enable": True, "trt_fp16_enable": precision == "fp16"}
    if graph != "encoder":
        for level in ("min", "opt", "max"):
            shapes = graph_input_shapes(bundle.manifest, graph, level)
            opts[f"trt_profile_{level}_shapes"] = ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())
    return opts


def session_options(ort: Any, threads: Optional[int] = None, spinning: bool = False) -> Any:
    """The session options every samantic graph runs with (see :class:`OnnxRuntimeEngine`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # memory-pattern planning pre-allocates every intermediate of the encoder at once: sam_vit_b's
    # encoder peaked at 6.9 GiB with it and 3.7 GiB without, at the same speed (benchmarks/backends.py)
    options.enable_mem_pattern = False
    return options


class OnnxRuntimeEngine(BundleEngine):
    """Runs a bundle's encoder, prompt and upscale graphs with onnxruntime.

    Args:
        bundle: a loaded :class:`~samantic.runtime.bundle.Bundle`.
        precision: ``"fp32"`` or ``"int8"`` (onnxruntime dynamic quantization, CPU).
        device: ``"auto"`` (GPU providers when installed, else CPU), ``"cpu"``, ``"cuda[:N]"``.
        threads: intra-op threads (None: onnxruntime's default).
        providers: explicit providers, overriding ``device``.
        spinning: let idle intra-op threads busy-wait for the next run (onnxruntime's default). Off by
            default: each of the three sessions has its own pool, and threads spinning after one graph
            steal the cores from the next graph and from the post-processing between runs.
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto", threads: Optional[int] = None,
                 providers: Optional[Sequence[Any]] = None, spinning: bool = False) -> None:
        ort = import_onnxruntime()
        if precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}")
        super().__init__(bundle)
        self.precision = precision
        options = session_options(ort, threads, spinning)
        self.sessions = {}
        for g in ("encoder", "prompts", "upscale"):
            per = bundle.manifest["graphs"].get(g, {})
            want = precision if precision in per else "fp32"
            if precision == "int8" and g == "encoder" and "int8" not in per:
                bundle.graph(g, "int8")  # raises, naming the missing version
            chosen = providers
            if chosen is None:
                chosen = select_providers(device, ort.get_available_providers(), trt_ep_options(bundle, g, precision))
            self.sessions[g] = ort.InferenceSession(str(bundle.graph(g, want)), sess_options=options,
                                                    providers=list(chosen))
        active = self.sessions["encoder"].get_providers()
        self.providers = active
        self.device_id = parse_device(device)[1]
        self.on_gpu = active[0] in GPU_PROVIDERS
        self.has_head = any(o.name == "class_logits" for o in self.sessions["prompts"].get_outputs())
        self._set_tasks({i.name for i in self.sessions["prompts"].get_inputs()})
        self.embedding: Any = None

    # step helpers -------------------------------------------------------------------------------

    def _run(self, graph: str, feeds: Dict[str, Any], device_outputs: Sequence[str] = ()) -> Dict[str, Any]:
        sess = self.sessions[graph]
        names = [o.name for o in sess.get_outputs()]
        if not self.on_gpu:
            return dict(zip(names, sess.run(names, feeds)))
        # IO binding: device-resident inputs stay put, chosen outputs stay on the device
        binding = sess.io_binding()
        for k, v in feeds.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(k, v)
        for n in names:
            binding.bind_output(n, "cuda" if n in device_outputs else "cpu", self.device_id if n in device_outputs else 0)
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: (o if n in device_outputs else o.numpy()) for n, o in zip(names, outs)}

    def encode(self, x: np.ndarray) -> None:
        self.embedding = self._run("encoder", {"image": np.ascontiguousarray(x, np.float32)},
                                   device_outputs=("image_embeddings",))["image_embeddings"]

    def run_prompts(self, coords: np.ndarray, task: int = 0) -> PromptOutputs:
        if self.embedding is None:
            raise RuntimeError("call encode() first")
        pc, pl = point_prompts(coords)
        feeds = {"image_embeddings": self.embedding, "point_coords": pc, "point_labels": pl}
        task_in = self.task_feed(task)
        if task_in is not None:
            feeds["task"] = task_in
        out = self._run("prompts", feeds, device_outputs=("src", "mask_tokens"))
        tokens = out["mask_tokens"]
        return PromptOutputs(
            iou_preds=np.asarray(out["iou_predictions"], np.float32),
            mask_tokens=tokens if isinstance(tokens, np.ndarray) else _HostView(tokens),
            class_logits=out.get("class_logits"),
            state=(out["src"], tokens),
        )

    def upscale(self, out: PromptOutputs, prompt_idx: np.ndarray, mask_idx: np.ndarray) -> np.ndarray:
        if len(prompt_idx) == 0:
            return self.no_masks()
        src, tokens = out.state
        feeds = {"src": src, "mask_tokens": tokens, **upscale_indices(prompt_idx, mask_idx, self.multimask)}
        return np.asarray(self._run("upscale", feeds)["low_res_logits"], np.float32)

    def reset(self) -> None:
        self.embedding = None


class _HostView:
    """Mask tokens on the device, copied to the host only if a mask scorer reads them."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._host: Optional[np.ndarray] = None

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._host is None:
            self._host = self.value.numpy()
        return self._host[index]
