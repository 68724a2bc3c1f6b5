"""Model registry (timm's pattern): named architectures -> configs -> segment-anything modules.

A registered function is named after the model and returns its
:class:`~samantic.models.configs.SamConfig`; :func:`create_model` builds the
model from segment-anything's own classes, so official checkpoints load
unchanged. torch and segment-anything are imported only when a model is built.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union, overload

from samantic.models.configs import SamConfig
from samantic.models.loading import OPTIONAL_THRESHOLD_NAMES, THRESHOLD_NAMES

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = [
    "ModelEntry",
    "build_sam",
    "create_model",
    "default_thresholds",
    "get_config",
    "get_model_entry",
    "list_models",
    "recommended_thresholds",
    "register_model",
    "thresholds_source",
]

ConfigFn = Callable[[], SamConfig]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: Registry key (the function's name).
        config_fn: Returns the architecture's :class:`SamConfig`.
        default_weights: Weights :func:`create_model` loads unless told
            ``pretrained=False``: a weight tag, a file path, or
            ``"pkg:<path>"`` for a file shipped inside the samantic package.
            ``None`` when the model has no weights that come without asking
            (the official models need a download, see ``pretrained=True``).
        description: First line of the function's docstring.
        thresholds: Segment-everything thresholds recommended for the default weights
            (``pred_iou_thresh``, ``stability_score_thresh``, optionally ``box_nms_thresh``), chosen on
            held-out data; ``None``: segment-anything's defaults (0.88 / 0.95, box NMS 0.7) apply.
    """

    name: str
    config_fn: ConfigFn
    default_weights: Optional[str] = None
    description: str = ""
    thresholds: Optional[Mapping[str, float]] = None


_MODELS: Dict[str, ModelEntry] = {}


@overload
def register_model(fn: ConfigFn) -> ConfigFn: ...


@overload
def register_model(*, default_weights: Optional[str] = None,
                   thresholds: Optional[Mapping[str, float]] = None) -> Callable[[ConfigFn], ConfigFn]: ...


DEFAULT_MODEL = "sam_nano"  # the SAM used when none is named (`samantic segment`, a SAM-CP head recording none)
SAM_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}  # segment-anything's defaults
SAM_BOX_NMS = 0.7  # segment-anything's box_nms_thresh: what a model or file recommending none runs at
# sam_nano (v9): best F1 at IoU 0.5 on seeds 500-559 over pred_iou x stability x box NMS (model card; v8
# 0.8 / 0.93 / 0.3, v7 0.8 / 0.9 / 0.3; at segment-anything's box NMS 0.7 alone v7 0.8 / 0.95, v6 0.7, v5 0.6 / 0.95)
PRED_IOU_NANO, STABILITY_NANO, BOX_NMS_NANO = 0.7, 0.94, 0.3
PRED_IOU_PANOPTIC, STABILITY_PANOPTIC = 0.7, 0.92  # sam_nano_panoptic v2: best F1 at IoU 0.5 on v2 seeds 500-523
# sam_nano_sum v2, task "unspecified": best F1 at IoU 0.5 on v1 seeds 500-559 (its file's header records these and
# the part task's, calibrated on v2 seeds 500-559; model card; v1 0.8 / 0.93 / 0.3 before its IoU head was refitted)
PRED_IOU_SUM, STABILITY_SUM, BOX_NMS_SUM = 0.7, 0.93, 0.3


def register_model(fn: Optional[ConfigFn] = None, *, default_weights: Optional[str] = None,
                   thresholds: Optional[Mapping[str, float]] = None):
    """Registers a function returning a :class:`SamConfig` under its own name.

    Usable bare (``@register_model``) or with arguments
    (``@register_model(default_weights="pkg:assets/x.safetensors")``).

    Args:
        fn: The config function.
        default_weights: See :attr:`ModelEntry.default_weights`.
        thresholds: See :attr:`ModelEntry.thresholds`.

    Raises:
        ValueError: If the name is already registered, or thresholds name unknown keys
            or values outside [0, 1].
    """
    if thresholds is not None:
        bad = [k for k in thresholds if k not in THRESHOLD_NAMES + OPTIONAL_THRESHOLD_NAMES]
        if bad or not set(THRESHOLD_NAMES) <= set(thresholds) or not all(0.0 <= float(v) <= 1.0
                                                                          for v in thresholds.values()):
            raise ValueError(f"thresholds take {THRESHOLD_NAMES} (and optionally {OPTIONAL_THRESHOLD_NAMES}) in "
                             f"[0, 1], got {dict(thresholds)}")
        thresholds = dict(thresholds)

    def decorate(f: ConfigFn) -> ConfigFn:
        name = f.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        doc = (f.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelEntry(name, f, default_weights, doc[0] if doc else "", thresholds)
        return f

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str = "*") -> List[str]:
    """Names of registered models matching a shell-style pattern, sorted.

    Args:
        pattern: ``fnmatch`` pattern, e.g. ``"sam_vit_*"``.
    """
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of a model.

    Raises:
        ValueError: If the name is unknown; close matches and all names are listed.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a str, got {type(name).__name__}")
    try:
        return _MODELS[name]
    except KeyError:
        pass
    known = list_models()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(known)}")


def get_config(name: str, **overrides: Any) -> SamConfig:
    """The architecture config of a registered model, optionally with fields changed.

    Args:
        name: Registered model name.
        **overrides: :class:`SamConfig` fields to change.

    Raises:
        ValueError: Unknown model or field, or an invalid resulting config.
    """
    config = get_model_entry(name).config_fn()
    return config.replace(**overrides) if overrides else config


def build_sam(config: SamConfig) -> "Sam":
    """Builds a randomly initialized SAM from segment-anything's classes, in eval mode.

    Args:
        config: The architecture.

    Returns:
        A ``segment_anything.modeling.Sam``. It honours an active
        ``torch.device(...)`` context (``"meta"`` builds instantly).

    Raises:
        ImportError: If torch or segment-anything is missing.
    """
    torch, modeling = _import_torch_sam()
    if config.encoder_type == "conv":
        from samantic.models.encoders import ConvImageEncoder

        image_encoder = ConvImageEncoder(
            img_size=config.img_size, out_stride=config.patch_size, widths=config.encoder_widths,
            blocks=config.encoder_blocks, attn_depth=config.encoder_depth, num_heads=config.encoder_num_heads,
            out_chans=config.prompt_embed_dim,
        )
    else:
        image_encoder = _vit_encoder(torch, modeling, config)
    embedding = (config.image_embedding_size, config.image_embedding_size)
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=embedding,
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = modeling.MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=modeling.TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
            attention_downsample_rate=config.decoder_attention_downsample_rate,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    sam = modeling.Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    return sam.eval()


def _vit_encoder(torch, modeling, config: SamConfig):
    return modeling.ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=len(config.pixel_mean),
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.encoder_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=config.encoder_qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=config.encoder_norm_eps),
        use_rel_pos=config.encoder_use_rel_pos,
        window_size=config.encoder_window_size,
        global_attn_indexes=config.encoder_global_attn_indexes,
    )


def create_model(
    name: str,
    checkpoint: Union[str, "os.PathLike[str]", None] = None,
    *,
    pretrained: Optional[bool] = None,
    progress: bool = True,
    **overrides: Any,
) -> "Sam":
    """Builds a registered model, optionally loading weights, in eval mode.

    The returned module carries ``samantic_name`` and ``samantic_config``
    attributes (used by :func:`~samantic.models.loading.save_checkpoint`).

    Args:
        name: Registered model name, e.g. ``"sam_vit_b"`` (see :func:`list_models`).
        checkpoint: A ``.pth``/``.pt``/``.safetensors`` file, or a weight tag
            such as ``"sam_vit_b.sa1b"`` (downloaded to the cache and verified
            if missing). Loading is strict.
        pretrained: ``None`` (default): load the entry's ``default_weights``
            if it has any (shipped files, no network), else random init.
            ``True``: load the default weights, or else the model's default
            weight tag (may download); error if there is none. ``False``:
            random init.
        progress: Show a progress bar if a download is needed.
        **overrides: :class:`SamConfig` fields to change, e.g. ``img_size=512``.
            Default weights are still loaded (strictly), so overrides that
            change parameter shapes need ``pretrained=False``. Without an
            ``img_size`` override, a model with a convolutional encoder is
            built at the input side its safetensors checkpoint file records
            (weights fine-tuned at another side, ``samantic train sum
            --input-size``).

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode.

    Raises:
        ValueError: Unknown model or config field, contradictory arguments, no
            pretrained weights, or a checkpoint that does not fit (its missing,
            unexpected and mis-shaped keys are listed).
        FileNotFoundError: The checkpoint file does not exist.
        ImportError: torch or segment-anything is missing.
    """
    from samantic.models import loading, weights

    entry = get_model_entry(name)
    config = get_config(name, **overrides)
    if checkpoint is not None and pretrained is False:
        raise ValueError(f"got checkpoint={checkpoint!r} and pretrained=False: pass one or the other")
    if checkpoint is None and pretrained is not False:
        checkpoint = entry.default_weights
        if checkpoint is None and pretrained:
            tags = weights.list_weights(model=name)
            if not tags:
                raise ValueError(
                    f"model {name!r} has no pretrained weights; pass checkpoint=... or pretrained=False"
                )
            checkpoint = tags[0].tag

    if checkpoint is not None and "img_size" not in overrides and config.encoder_type == "conv" \
            and os.path.isfile(checkpoint):
        # a conv encoder's weights fit any side: build the model at the side the file was trained at
        side = loading.recorded_input_size(checkpoint)
        if side is not None and side != config.img_size:
            config = config.replace(img_size=side)
    model = build_sam(config)
    model.samantic_name = name
    model.samantic_config = config
    # the recommended thresholds: those a weights file records (`samantic eval thresholds --record`), the
    # registry entry's for the default weights, else segment-anything's (recommended_thresholds)
    model.samantic_thresholds, model.samantic_task_thresholds = _weights_thresholds(entry, checkpoint)
    if checkpoint is not None:
        loading.load_checkpoint(model, checkpoint, model_name=name, progress=progress)
    return model.eval()


def recommended_thresholds(model, task: Optional[Union[str, int]] = None) -> Dict[str, float]:
    """Segment-everything thresholds for a model built by :func:`create_model` (see :func:`thresholds_source`)."""
    return thresholds_source(model, task)[0]


def thresholds_source(model, task: Optional[Union[str, int]] = None) -> Tuple[Dict[str, float], str]:
    """The thresholds segment-everything uses for ``model`` (built by :func:`create_model`) when the user gives
    none, and where they come from, for SUM's ``task`` (None: "unspecified"):

    - ``"recorded for <task>"``: calibrated for that task and recorded in the weights file's header
      (``samantic eval thresholds --checkpoint FILE --task T --record``);
    - ``"recorded"``: the file's "unspecified" calibration, for a task the file records none for;
    - ``"registry"``: the registry entry's recommendation, when the model carries its default weights;
    - ``"segment-anything"``: segment-anything's 0.88 / 0.95.

    Raises:
        ValueError: an unknown task.
    """
    return _pick_thresholds(getattr(model, "samantic_thresholds", None),
                            getattr(model, "samantic_task_thresholds", None) or {}, task)


def default_thresholds(name: str, checkpoint: Optional[str] = None,
                       task: Optional[Union[str, int]] = None) -> Tuple[Dict[str, float], str]:
    """:func:`thresholds_source` of ``create_model(name, checkpoint=checkpoint)`` without building the model
    (None: the default weights).

    Raises:
        KeyError: an unregistered model. FileNotFoundError / ValueError: an unreadable weights file or header.
        ValueError: an unknown task.
    """
    entry = get_model_entry(name)
    return _pick_thresholds(*_weights_thresholds(entry, entry.default_weights if checkpoint is None else checkpoint),
                            task)


def _weights_thresholds(entry: ModelEntry, checkpoint: Optional[str]) -> Tuple[Optional[Dict[str, float]], Dict]:
    """(the registry entry's thresholds when ``checkpoint`` is its default weights, else None;
    the per-task thresholds a weights file records, a file shipped in the package included: sam_nano_sum's
    records its tasks' own)."""
    from samantic.models import loading

    shipped = checkpoint is not None and checkpoint == entry.default_weights
    registry = dict(entry.thresholds) if shipped and entry.thresholds else None
    path = checkpoint
    if isinstance(checkpoint, str) and checkpoint.startswith(loading.PACKAGE_PREFIX):
        path = str(loading.resolve_checkpoint(checkpoint))
    recorded = {}
    if path is not None and os.path.isfile(path):
        recorded = loading.recorded_thresholds(path)
    return registry, recorded


def _pick_thresholds(registry: Optional[Mapping[str, float]], recorded: Mapping[str, Mapping[str, float]],
                     task: Optional[Union[str, int]]) -> Tuple[Dict[str, float], str]:
    from samantic.models.tasks import task_name

    name = "unspecified" if task is None else task_name(task)
    if name in recorded:
        return dict(recorded[name]), f"recorded for {name}"
    if "unspecified" in recorded:
        return dict(recorded["unspecified"]), "recorded"
    if registry:
        return dict(registry), "registry"
    return dict(SAM_THRESHOLDS), "segment-anything"


def _import_torch_sam():
    try:
        import torch
        from segment_anything import modeling
    except ImportError as e:
        raise ImportError(
            f"building SAM models needs torch and segment-anything ({e}): pip install 'samantic[torch]'"
        ) from e
    return torch, modeling


# --------------------------------------------------------------------------- registered architectures
# The three official models use segment-anything's numbers (build_sam.py) so
# that the official checkpoints load unchanged.


@register_model
def sam_vit_h() -> SamConfig:
    """SAM ViT-H (official, 641M parameters)."""
    return SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    )


@register_model
def sam_vit_l() -> SamConfig:
    """SAM ViT-L (official, 312M parameters)."""
    return SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    )


@register_model
def sam_vit_b() -> SamConfig:
    """SAM ViT-B (official, 94M parameters)."""
    return SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    )


# Trained by `samantic train sam` on the shapes world; see assets/sam_nano.md (the model card).
# Thresholds: `samantic eval thresholds` on held-out seeds 500-559 (best F1 at IoU 0.5, box NMS calibrated too).
@register_model(default_weights="pkg:assets/sam_nano.safetensors",
                thresholds={"pred_iou_thresh": PRED_IOU_NANO, "stability_score_thresh": STABILITY_NANO,
                            "box_nms_thresh": BOX_NMS_NANO})
def sam_nano() -> SamConfig:
    """Small SAM for CPUs and tests: 384 px input, conv encoder at stride 8, 3.0M parameters, trained by samantic."""
    return _nano_conv(384, 8)


# sam_nano's architecture with weights fine-tuned from sam_nano v7 on v1 + v2 (panoptic) scenes by `samantic train sam`:
# it segments stuff regions and the parts of composite things, which sam_nano does not; SAM-CP's patch
# source. See assets/sam_nano_panoptic.md (the model card). Thresholds: `samantic eval thresholds --scenes v2`
# on held-out seeds 500-523 (best F1 at IoU 0.5, one mask per entity).
@register_model(default_weights="pkg:assets/sam_nano_panoptic.safetensors",
                thresholds={"pred_iou_thresh": PRED_IOU_PANOPTIC, "stability_score_thresh": STABILITY_PANOPTIC})
def sam_nano_panoptic() -> SamConfig:
    """sam_nano fine-tuned on panoptic (v2) scenes too: stuff regions and parts; SAM-CP's patch source; trained by samantic."""
    return _nano_conv(384, 8)


# sam_nano's architecture with SUM's task table, fine-tuned from sam_nano v9 by `samantic train sum` on 120 labelled
# panoptic (v2) scenes and the pseudo-labels of 240 unlabelled ones: `task=` (unspecified, salient, entity, part)
# picks the granularity; v2's IoU head refitted on those labelled scenes' task clicks (`samantic train iou-head
# --kind tasks`). See assets/sam_nano_sum.md (the model card).
@register_model(default_weights="pkg:assets/sam_nano_sum.safetensors",
                thresholds={"pred_iou_thresh": PRED_IOU_SUM, "stability_score_thresh": STABILITY_SUM,
                            "box_nms_thresh": BOX_NMS_SUM})
def sam_nano_sum() -> SamConfig:
    """sam_nano fine-tuned with SUM: task prompts (unspecified, salient, entity, part) on v2 scenes; trained by samantic."""
    return _nano_conv(384, 8)


def _nano_vit() -> SamConfig:
    return SamConfig(
        encoder_embed_dim=192,
        encoder_depth=6,
        encoder_num_heads=6,
        encoder_global_attn_indexes=(2, 5),
        encoder_window_size=8,
        img_size=384,
        patch_size=16,
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    )


def _nano_conv(img_size: int, stride: int) -> SamConfig:
    return _nano_vit().replace(
        encoder_type="conv",
        encoder_widths=(32, 64, 128, 256),
        encoder_blocks=(1, 2, 4, 2),
        encoder_depth=2,
        encoder_num_heads=8,
        encoder_global_attn_indexes=(),
        img_size=img_size,
        patch_size=stride,
    )


# The other candidates of the v5 encoder A/B (benchmarks/results/nano_ab/); same prompt encoder and
# mask decoder as sam_nano, no shipped weights.
@register_model
def sam_nano_vit() -> SamConfig:
    """sam_nano v1-v4's architecture: ViT encoder (384 px, patch 16, width 192, depth 6); no shipped weights."""
    return _nano_vit()


@register_model
def sam_nano_conv() -> SamConfig:
    """sam_nano with its conv encoder at stride 16 (384 px, 96 x 96 low-res masks); v5 candidate, no shipped weights."""
    return _nano_conv(384, 16)


@register_model
def sam_nano_conv512() -> SamConfig:
    """sam_nano with its conv encoder at stride 16 and 512 px input; v5 candidate, no shipped weights."""
    return _nano_conv(512, 16)
