"""The deployable runtime: ``Segmenter`` on torch, onnxruntime or TensorRT, and bundle loading.

Torch-free: with ``pip install 'samantic[runtime]'`` (onnxruntime, numpy,
OpenCV, Pillow) a bundle runs without torch, the trainers or the exporters.
"""

from samantic.runtime.bundle import Bundle, BundleError
from samantic.runtime.segmenter import BACKENDS, PanopticResult, Result, Segmenter
from samantic.runtime.stream import FrameStream, StreamFrame, StreamSummary

__all__ = ["BACKENDS", "Bundle", "BundleError", "FrameStream", "PanopticResult", "Result", "Segmenter", "StreamFrame",
           "StreamSummary"]
