"""Reading head files (safetensors with a metadata header), shared by the U-SAM and SAM-CP heads."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple, Union


def read_head_file(path: Union[str, Path], what: str, map_location: str = "cpu") -> Tuple[Path, Dict[str, str], dict]:
    """``(path, metadata, state dict)`` of a head file; errors name the file and the problem.

    ``path`` may be ``"pkg:assets/NAME.safetensors"``, a head shipped inside the samantic package.

    Raises:
        FileNotFoundError: no such file (``what`` names the kind of head).
        ValueError: not a readable safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from samantic.models.loading import PACKAGE_PREFIX, resolve_checkpoint

    if str(path).startswith(PACKAGE_PREFIX):
        path = resolve_checkpoint(str(path))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=map_location)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return path, meta, state
