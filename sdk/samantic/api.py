"""Convenience entry points of the SDK (imported lazily by ``samantic``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

_GENERATORS: Dict[Tuple, Any] = {}


def segment_everything(image: np.ndarray, model: Union[str, Any] = "sam_nano", checkpoint: Optional[str] = None,
                       **options: Any) -> List[Dict[str, Any]]:
    """Segments everything in an RGB uint8 image with samantic's automatic mask generator.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        model: a registered model name (built once and cached) or a ``Sam`` instance.
        checkpoint: weights for a named model (default: its shipped weights).
        **options: :class:`~samantic.pipeline.AmgConfig` options (``points_per_side``, ``output_mode``, ...).

    Returns:
        segment-anything's record format (see :meth:`AutomaticMaskGenerator.generate`).
    """
    from samantic.pipeline import AmgConfig, AutomaticMaskGenerator

    config = AmgConfig().replace(**options)
    if isinstance(model, str):
        from samantic.models import create_model

        key = (model, checkpoint)
        if key not in _GENERATORS:
            _GENERATORS.clear()  # keep one model resident
            _GENERATORS[key] = create_model(model, checkpoint=checkpoint)
        sam = _GENERATORS[key]
    else:
        sam = model
    return AutomaticMaskGenerator(sam, config=config).generate(image)
