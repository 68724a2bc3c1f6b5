"""Where U-SAM's example images come from: one interface, three sources.

U-SAM learns class names from single-object images that carry only an
image-level label. A source turns ``(classes, per_class, seed)`` into such
images:

    shapes     procedural single-object images (the built-in stand-in for a
               text-to-image model), ``samantic.train.data.shapes.render_single``
    folder     ImageFolder layout ``root/<class>/*.jpg``: collected or web-crawled images
    diffusers  a Stable Diffusion pipeline from a local model directory, prompted
               with templates such as "a photo of a {}" (optional extra)

Every example has a ``key`` that names where it came from (a file path, or the
generator and seed), so errors and the feature cache can refer to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

SOURCES = ("shapes", "folder", "diffusers")
DEFAULT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {} on a plain background")


@dataclass
class Example:
    """One single-object image with its image-level label."""

    image: np.ndarray  # uint8 RGB [H, W, 3]
    label: str
    key: str


class ExampleSource:
    """Base of the sources: ``examples`` yields ``per_class`` images per class, class by class."""

    name = "source"

    def check(self, classes: Sequence[str]) -> None:
        """Raises ValueError if this source cannot produce one of ``classes``."""

    def examples(self, classes: Sequence[str], per_class: int, seed: int = 0) -> Iterator[Example]:
        raise NotImplementedError

    def failures(self) -> List[Tuple[str, str]]:
        """(key, reason) of inputs skipped so far (unreadable files)."""
        return []


class ShapesSource(ExampleSource):
    """Procedural single-object images of the shapes world (seeds ``seed .. seed + per_class - 1``)."""

    name = "shapes"

    def check(self, classes: Sequence[str]) -> None:
        from samantic.train.data.shapes import check_classes

        check_classes(classes)

    def examples(self, classes: Sequence[str], per_class: int, seed: int = 0) -> Iterator[Example]:
        from samantic.train.data.shapes import render_single

        self.check(classes)
        for c in classes:
            for s in range(seed, seed + per_class):
                yield Example(render_single(c, s).image, c, f"shapes:{c}:{s}")


class FolderSource(ExampleSource):
    """ImageFolder layout: ``root/<class>/<image>``, images found recursively by extension.

    At most ``per_class`` images per class, in sorted order; unreadable files are
    skipped and listed by :meth:`failures`.
    """

    name = "folder"

    def __init__(self, root) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder does not exist")
        self._failures: List[Tuple[str, str]] = []

    def available(self) -> List[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def files(self, name: str) -> List[Path]:
        from samantic.io.images import IMAGE_EXTENSIONS

        folder = self.root / name
        return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)

    def check(self, classes: Sequence[str]) -> None:
        from samantic.io.images import IMAGE_EXTENSIONS

        missing = [c for c in classes if not (self.root / c).is_dir()]
        if missing:
            have = ", ".join(self.available()) or "none"
            raise ValueError(f"{self.root}: no folder for {', '.join(map(repr, missing))} (class folders present: {have})")
        empty = [c for c in classes if not self.files(c)]
        if empty:
            raise ValueError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder of "
                             f"{', '.join(map(repr, empty))}")

    def examples(self, classes: Sequence[str], per_class: int, seed: int = 0) -> Iterator[Example]:
        from samantic.io.images import ImageReadError, read_image

        self.check(classes)
        for c in classes:
            files = self.files(c)
            if seed:
                files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
            taken = 0
            for f in files:
                if taken >= per_class:
                    break
                try:
                    image = read_image(f)
                except ImageReadError as e:
                    self._failures.append((str(f), str(e)))
                    continue
                taken += 1
                yield Example(image, c, str(f))

    def failures(self) -> List[Tuple[str, str]]:
        return list(self._failures)


class DiffusersSource(ExampleSource):
    """Images from a local Stable Diffusion pipeline (``pip install 'samantic[diffusers]'``).

    Args:
        model_dir: a ``diffusers`` pipeline directory (``model_index.json`` inside).
        templates: prompt templates with one ``{}`` for the class name; cycled per image.
        steps, guidance, size: sampler steps, classifier-free guidance scale, output side.
        device: torch device for the pipeline.
        pipeline: an already built pipeline (tests); ``model_dir`` is then ignored.
    """

    name = "diffusers"

    def __init__(self, model_dir=None, templates: Sequence[str] = DEFAULT_TEMPLATES, steps: int = 25,
                 guidance: float = 7.5, size: int = 512, device: str = "cpu", pipeline=None) -> None:
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"prompt templates need exactly one '{{}}' for the class name, got {list(bad or templates)!r}")
        self.templates = tuple(templates)
        self.steps, self.guidance, self.size, self.device = int(steps), float(guidance), int(size), device
        self.model_dir = None if model_dir is None else Path(model_dir)
        self._pipe = pipeline
        if pipeline is None:
            if self.model_dir is None:
                raise ValueError("the diffusers source needs --images pointing at a local Stable Diffusion model directory")
            if not (self.model_dir / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{self.model_dir}: not a diffusers pipeline directory (no model_index.json); "
                    "download a Stable Diffusion model elsewhere and copy its folder here"
                )

    def pipeline(self):
        if self._pipe is None:
            try:
                from diffusers import DiffusionPipeline
            except ImportError:
                raise ImportError("the diffusers source needs the optional extra: pip install 'samantic[diffusers]'") from None
            self._pipe = DiffusionPipeline.from_pretrained(str(self.model_dir), local_files_only=True).to(self.device)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def prompt(self, name: str, i: int) -> str:
        return self.templates[i % len(self.templates)].format(name.replace("_", " "))

    def examples(self, classes: Sequence[str], per_class: int, seed: int = 0) -> Iterator[Example]:
        import torch

        pipe = self.pipeline()
        for c in classes:
            for i in range(per_class):
                gen = torch.Generator(device="cpu").manual_seed(seed + i)
                out = pipe(self.prompt(c, i), num_inference_steps=self.steps, guidance_scale=self.guidance,
                           height=self.size, width=self.size, generator=gen, output_type="np")
                image = np.clip(np.asarray(out.images[0]) * 255.0 + 0.5, 0, 255).astype(np.uint8)
                yield Example(image, c, f"diffusers:{c}:{seed + i}")


def open_source(kind: str, images: Optional[str] = None, **kwargs) -> ExampleSource:
    """``shapes`` | ``folder`` (``images`` = the root) | ``diffusers`` (``images`` = the model directory)."""
    if kind == "shapes":
        return ShapesSource()
    if kind == "folder":
        if not images:
            raise ValueError("--source folder needs --images DIR (one sub-folder per class)")
        return FolderSource(images)
    if kind == "diffusers":
        return DiffusersSource(images, **kwargs)
    raise ValueError(f"unknown source {kind!r}; choose one of {', '.join(SOURCES)}")
