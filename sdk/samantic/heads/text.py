"""Text embeddings of class names for open-vocabulary SAM-CP heads (a CLIP text tower via open_clip).

A head trained with a text encoder keeps the embeddings of its vocabulary in its file
(:attr:`~samantic.heads.samcp.SamcpHead.text_embeddings`), so inference needs neither
open_clip nor the network; the encoder is needed again only to add class names
(:func:`~samantic.heads.samcp.add_samcp_classes`).

An encoder is named by a spec string::

    open_clip:MODEL[:PRETRAINED]      MODEL an open_clip model (``open_clip.list_models()``),
                                      PRETRAINED a tag of that model (downloaded once into the
                                      Hugging Face cache) or the path of a checkpoint file
    open_clip:local-dir:DIR           DIR holds open_clip_config.json and the weights
    open_clip:hf-hub:ORG/REPO         config and weights from the Hugging Face Hub

Example:
    >>> enc = open_text_encoder("open_clip:ViT-B-32:/models/vit_b_32_openai.bin")  # doctest: +SKIP
    >>> enc.encode(["cat", "dog"]).shape                                             # doctest: +SKIP
    torch.Size([2, 512])
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_TEMPLATE", "TEXT_ENCODER_KINDS", "TextEncoderSpec", "OpenClipTextEncoder", "open_text_encoder",
           "encode_class_names", "check_template"]

DEFAULT_TEMPLATE = "a photo of a {name}."
TEXT_ENCODER_KINDS = ("open_clip",)
_SCHEMAS = ("local-dir:", "hf-hub:")
_INSTALL = "pip install 'samantic[clip]'"
# seeds the weights of a tower built without pretrained ones, so that two processes agree on them
_RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class TextEncoderSpec:
    """A parsed ``open_clip:MODEL[:PRETRAINED]`` spec (see the module docstring)."""

    kind: str
    model: str
    pretrained: str = ""

    @staticmethod
    def parse(spec: str) -> "TextEncoderSpec":
        kind, sep, rest = str(spec).partition(":")
        if kind not in TEXT_ENCODER_KINDS or not sep or not rest:
            raise ValueError(f"text encoder must be 'open_clip:MODEL[:PRETRAINED]' (kinds: {', '.join(TEXT_ENCODER_KINDS)}), "
                             f"got {spec!r}")
        if rest.startswith(_SCHEMAS):
            # a schema names config and weights together (open_clip ignores PRETRAINED there)
            return TextEncoderSpec(kind, rest)
        model, _, pretrained = rest.partition(":")
        if not model:
            raise ValueError(f"text encoder {spec!r} names no model")
        return TextEncoderSpec(kind, model, pretrained)

    @property
    def schema(self) -> Optional[str]:
        return next((s[:-1] for s in _SCHEMAS if self.model.startswith(s)), None)

    @property
    def local_dir(self) -> Optional[Path]:
        """The folder of an ``open_clip:local-dir:DIR`` spec, else None."""
        return Path(self.model[len("local-dir:"):]) if self.schema == "local-dir" else None

    def __str__(self) -> str:
        return f"{self.kind}:{self.model}" + (f":{self.pretrained}" if self.pretrained else "")


def check_template(template: str) -> str:
    """A prompt template with one ``{name}`` field; anything else raises ``ValueError``."""
    try:
        ok = "{name}" in template and template.format(name="x") != template
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"prompt template must contain '{{name}}' and no other field, got {template!r}")
    return template


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"text encoders of class names need open_clip ({e}): {_INSTALL}") from None
    return open_clip


def _weights_hint(spec: TextEncoderSpec) -> str:
    return (f"the weights must be available locally: give the path of a checkpoint file as PRETRAINED "
            f"(open_clip:{spec.model}:/path/to/open_clip_pytorch_model.bin), a folder as "
            f"open_clip:local-dir:DIR (open_clip_config.json + weights), or have them in the Hugging Face cache")


class OpenClipTextEncoder:
    """The text tower of an open_clip model; :meth:`encode` gives L2-normalised embeddings.

    Args:
        spec: ``open_clip:MODEL[:PRETRAINED]`` (see the module docstring).
        device: where the tower runs.

    Attributes:
        spec: the parsed spec, local paths made absolute; ``str(spec)`` is what a head file records.
        dim: width of the embeddings.
        pretrained: False when the tower has no trained weights (random, seeded: for tests only).

    Raises:
        ImportError: open_clip is not installed (names the extra).
        ValueError: a malformed spec, an unknown model, or weights that cannot be loaded.
    """

    def __init__(self, spec: str, device: str = "cpu") -> None:
        self.spec = TextEncoderSpec.parse(spec)
        open_clip = _import_open_clip()
        s = self.spec
        if s.schema is None:
            known = open_clip.list_models()
            if s.model not in known:
                close = difflib.get_close_matches(s.model, known, n=5)
                hint = f"; did you mean: {', '.join(close)}?" if close else f" (open_clip knows {len(known)} models)"
                raise ValueError(f"{s}: unknown open_clip model {s.model!r}{hint}")
            if s.pretrained and not os.path.isfile(s.pretrained):
                tags = open_clip.list_pretrained_tags_by_model(s.model)
                if _looks_like_path(s.pretrained):
                    raise ValueError(f"{s}: no such checkpoint file {s.pretrained!r}; {_weights_hint(s)}")
                if s.pretrained not in tags:
                    shown = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "") if tags else "none"
                    raise ValueError(f"{s}: {s.pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                                     f"{s.model} (tags: {shown}); {_weights_hint(s)}")
        elif s.local_dir is not None and not s.local_dir.is_dir():
            raise ValueError(f"{s}: no such folder")
        self.pretrained = bool(s.pretrained) or (s.local_dir is not None and _has_weights(s.local_dir))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_INIT_SEED)
                model = open_clip.create_model(s.model, pretrained=s.pretrained or None, device=device)
            self.tokenizer = open_clip.get_tokenizer(s.model)
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError, OSError, hub errors, pickle errors
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            if s.pretrained and os.path.isfile(s.pretrained):
                raise ValueError(f"{s}: could not load the checkpoint file {s.pretrained} ({reason}); it must be "
                                 f"open_clip weights of {s.model}") from None
            what = "could not load the pretrained weights" if (s.pretrained or s.schema) else "could not build the model"
            raise ValueError(f"{s}: {what} ({reason}); {_weights_hint(s)}") from None
        self.model = model.eval()
        self.device = torch.device(device)
        # a head records the spec: local files by absolute path, so it works from any directory
        if s.pretrained and os.path.isfile(s.pretrained):
            self.spec = replace(s, pretrained=str(Path(s.pretrained).resolve()))
        elif s.local_dir is not None:
            self.spec = replace(s, model=f"local-dir:{s.local_dir.resolve()}")
        self.dim = int(self._encode_prompts(["a"]).shape[1])

    def _encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.inference_mode():
            emb = self.model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1).cpu()

    def encode(self, names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
        """Class names -> ``Tensor[N, dim]`` float32, L2-normalised (one prompt per name, from ``template``)."""
        check_template(template)
        names = list(names)
        if not names:
            return torch.zeros(0, self.dim)
        return self._encode_prompts([template.format(name=n) for n in names])


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or Path(value).suffix in (".bin", ".pt", ".pth", ".safetensors")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth"))


def open_text_encoder(spec: str, device: str = "cpu") -> OpenClipTextEncoder:
    """The encoder a spec names (see :class:`OpenClipTextEncoder`)."""
    return OpenClipTextEncoder(spec, device=device)


def encode_class_names(names: Sequence[str], spec: str, template: str = DEFAULT_TEMPLATE,
                       device: str = "cpu") -> torch.Tensor:
    """``Tensor[N, dim]``: L2-normalised text embeddings of ``names`` by the encoder ``spec``."""
    return open_text_encoder(spec, device).encode(names, template)
