"""samantic: segment images by class names with Segment Anything, built for edge GPUs.

The top level stays light: importing ``samantic`` never imports torch,
onnxruntime or the trainers; the names below load their modules on first use.
"""

from samantic._version import __version__

_LAZY = {
    "AutomaticMaskGenerator": "samantic.pipeline",
    "AmgConfig": "samantic.pipeline",
    "segment_everything": "samantic.api",
    "create_model": "samantic.models",
    "list_models": "samantic.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'samantic' has no attribute {name!r}")
