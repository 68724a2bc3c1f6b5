"""samantic: segment images by class names with Segment Anything, built for edge GPUs.

The top level stays light: importing ``samantic`` never imports torch,
onnxruntime or the trainers. Heavy parts are imported from their subpackages.
"""

from samantic._version import __version__

__all__ = ["__version__"]
