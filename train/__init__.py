"""samantic.train: data sources, feature caches, trainers and metrics.

Never imported by the runtime path (a Jetson install needs only
``samantic.runtime`` and ``samantic._C``).
"""

try:
    import cv2  # noqa: F401  (the shapes world, training crops and metrics draw with it)
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError(f"samantic.train needs OpenCV ({e}): pip install 'samantic[train]'") from None
