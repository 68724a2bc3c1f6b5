"""samantic: segment images by class names with Segment Anything, built for edge GPUs.

The top level stays light: importing ``samantic`` never imports torch,
onnxruntime, OpenCV or the trainers; the names below load their modules on
first use (PEP 562), so ``from samantic import Segmenter`` costs what
``samantic.runtime`` costs and no more.
"""

from samantic._version import __version__

_LAZY = {
    "AutomaticMaskGenerator": "samantic.pipeline",
    "AmgConfig": "samantic.pipeline",
    "Predictor": "samantic.pipeline",
    "segment_everything": "samantic.api",
    "create_model": "samantic.models",
    "list_models": "samantic.models",
    "Segmenter": "samantic.runtime",
    "Result": "samantic.runtime",
    "PanopticResult": "samantic.runtime",
    "Bundle": "samantic.runtime",
    "BundleError": "samantic.runtime",
    "read_image": "samantic.io",
    "ImageReadError": "samantic.io",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'samantic' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
