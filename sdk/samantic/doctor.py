"""What this installation has and can use now: versions, compiled kernel backends, devices.

Used by ``samantic doctor``; import-light (optional packages are only probed).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional

# (distribution name, import name) of everything samantic may use
PACKAGES = [
    ("numpy", "numpy"),
    ("opencv-python-headless", "cv2"),
    ("pycocotools", "pycocotools"),
    ("safetensors", "safetensors"),
    ("typer", "typer"),
    ("rich", "rich"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("segment-anything", "segment_anything"),
    ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"),
    ("onnxruntime-gpu", "onnxruntime"),
    ("tensorrt", "tensorrt"),
    ("ray", "ray"),
    ("pyarrow", "pyarrow"),
]


def _dist_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _packages() -> List[Dict[str, Any]]:
    rows = []
    for dist, module in PACKAGES:
        version = _dist_version(dist)
        if version is None and dist in ("onnxruntime-gpu",):
            continue  # only listed when installed
        if version is None and module == "cv2":
            version = _dist_version("opencv-python")
        importable = importlib.util.find_spec(module) is not None
        rows.append({"package": dist, "version": version, "importable": importable})
    return rows


def cuda_archs(spec: str) -> Dict[str, List[int]]:
    """The CUDA code a build embeds, from its CMAKE_CUDA_ARCHITECTURES (commas for semicolons).

    ``"75-real,86-real,90"`` -> ``{"sass": [75, 86, 90], "ptx": [90]}``: ``NN-real`` is machine code
    (SASS) for sm_NN only, ``NN-virtual`` PTX only, a plain ``NN`` both; PTX is JIT-compiled by
    the driver for GPUs newer than any SASS.
    """
    sass: List[int] = []
    ptx: List[int] = []
    for item in filter(None, (a.strip() for a in spec.replace(";", ",").split(","))):
        arch, _, kind = item.partition("-")
        digits = "".join(c for c in arch if c.isdigit())
        if not digits:
            continue
        if kind in ("", "real"):
            sass.append(int(digits))
        if kind in ("", "virtual"):
            ptx.append(int(digits))
    return {"sass": sorted(set(sass)), "ptx": sorted(set(ptx))}


def format_cuda_archs(archs: Dict[str, List[int]]) -> str:
    sass = ", ".join(f"sm_{a}" for a in archs["sass"]) or "none"
    ptx = ", ".join(f"compute_{a}" for a in archs["ptx"]) or "none"
    return f"SASS {sass}; PTX {ptx}"


def _kernels() -> Dict[str, Any]:
    try:
        from samantic import _C
    except ImportError as e:
        return {"error": f"samantic._C cannot be imported: {e}", "compiled": [], "usable": {}}
    info = _C.build_info()
    cuda = _C.cuda_status()
    usable = {"cpu": {"usable": True, "detail": f"{info['cpu_threads']} threads"}}
    out: Dict[str, Any] = {"compiled": list(info["compiled_backends"]), "build": dict(info), "cuda_status": dict(cuda)}
    if cuda["compiled"]:
        out["cuda_archs"] = cuda_archs(str(info.get("cuda_architectures", "")))
        n = int(cuda["device_count"])
        if n and hasattr(_C, "cuda_probe"):
            # only with a device: the probe creates a CUDA context on each one
            devices = [dict(d, capability=list(d["capability"])) for d in _C.cuda_probe()]
            out["cuda_devices"] = devices
            parts = []
            for d in devices:
                sm = f"sm_{d['capability'][0]}{d['capability'][1]}"
                state = (f"kernels load (code sm_{d['binary_version']}" + (", from PTX)" if d["binary_version"] not in
                                                                          out["cuda_archs"]["sass"] else ")")
                         if d["kernels_load"] else f"kernels do not load: {d['error']}")
                parts.append(f"{d['index']}: {d['name']} ({sm}), {state}")
            ok = bool(devices) and all(d["kernels_load"] for d in devices)
            usable["cuda"] = {"usable": ok, "detail": f"{n} device(s): " + "; ".join(parts)}
        else:
            detail = f"{n} device(s)" if n else f"no device: {cuda['error']}"
            usable["cuda"] = {"usable": n > 0, "detail": detail}
    else:
        usable["cuda"] = {"usable": False, "detail": "not compiled (no nvcc at build time)"}
    out["usable"] = usable
    return out


def _torch() -> Dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    try:
        import torch
    except Exception as e:  # a broken torch install must not break doctor
        return {"installed": True, "error": str(e)}
    out: Dict[str, Any] = {"installed": True, "version": torch.__version__, "cuda_available": torch.cuda.is_available()}
    out["cuda_build"] = torch.version.cuda
    if out["cuda_available"]:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _onnxruntime() -> Dict[str, Any]:
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False}
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"installed": True, "error": str(e)}
    return {"installed": True, "version": ort.__version__, "providers": list(ort.get_available_providers())}


def _tensorrt() -> Dict[str, Any]:
    if importlib.util.find_spec("tensorrt") is None:
        return {"installed": False, "detail": "pip install 'samantic[trt]' (needs an NVIDIA GPU)"}
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:
        return {"installed": True, "error": str(e)}
    return {"installed": True, "version": getattr(trt, "__version__", "?")}


def collect() -> Dict[str, Any]:
    """Everything ``samantic doctor`` reports, as a JSON-serialisable dict."""
    from samantic import __version__

    return {
        "samantic": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": _packages(),
        "kernels": _kernels(),
        "torch": _torch(),
        "onnxruntime": _onnxruntime(),
        "tensorrt": _tensorrt(),
    }
