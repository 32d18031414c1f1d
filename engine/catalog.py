"""The backbone catalog: torchvision's classification models and timm's, their pretrained weights, and what a
project may name. It knows names only (the project file's model.backbone and model.weights), so config
validation can ask it without building anything.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torchvision

# A backbone the user will recognise, shown when the name they typed is unknown.
_EXAMPLES = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16")
# timm's models are named "timm/<model>" (its pretrained tag goes in model.weights), keeping both catalogs apart.
TIMM_PREFIX = "timm/"
_TIMM_EXAMPLES = ("timm/efficientnet_lite0", "timm/resnet50", "timm/convnext_tiny", "timm/vit_small_patch16_224")
# The one backbone with ImageNet weights that ship with the install (see engine.backbones.load_bundled_weights).
BUNDLED = "BUNDLED"
BUNDLED_BACKBONE = "timm/efficientnet_lite0"


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    # module= keeps to image classification (no detection, segmentation, video, quantized models).
    return frozenset(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=1)
def _catalog() -> tuple[str, ...]:
    import timm  # here, not at the top: importing timm's hundreds of model modules costs a start seconds

    # timm's "*_enc" models are the image encoders of vision-language models: no classifier to replace.
    timm_names = [TIMM_PREFIX + n for n in timm.list_models() if not n.endswith("_enc")]
    return tuple(sorted([*_torchvision_names(), *timm_names]))


@functools.lru_cache(maxsize=1)
def _catalog_set() -> frozenset[str]:
    return frozenset(_catalog())


def list_backbones() -> list[str]:
    """Names of the torchvision classification models and of timm's models as "timm/<model>", sorted."""
    return list(_catalog())


def is_known(backbone: str) -> bool:
    """Whether a backbone is in the catalog; a torchvision name is looked up without importing timm."""
    if timm_model_name(backbone) is None:  # only timm's names carry the prefix
        return backbone in _torchvision_names()
    return backbone in _catalog_set()


def timm_model_name(backbone: str) -> str | None:
    """timm's own name of a "timm/<model>" backbone; None for a torchvision one."""
    return backbone[len(TIMM_PREFIX) :] if backbone.startswith(TIMM_PREFIX) else None


def weights_enum(backbone: str) -> Any:  # a torchvision WeightsEnum class (untyped) or None
    """torchvision's weights enum of a backbone (None for timm's and for models without weights)."""
    try:
        return torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError):
        return None


def timm_tags(arch: str) -> list[str]:
    """The pretrained tags of a timm model that have weights, timm's default first."""
    from timm.models import get_arch_pretrained_cfgs, is_model_pretrained

    # timm leaves an untagged entry's tag None: it has no name to offer here (its weights are "DEFAULT").
    return [
        cfg.tag
        for name, cfg in get_arch_pretrained_cfgs(arch).items()
        if cfg.tag is not None and is_model_pretrained(name)
    ]


def weight_names(backbone: str) -> list[str]:
    """The pretrained weights a backbone offers: "DEFAULT" first, then the enum members or timm's pretrained tags.

    "timm/efficientnet_lite0" also offers "BUNDLED": ImageNet weights that ship with the install.
    """
    arch = timm_model_name(backbone)
    if arch is not None:
        tags = timm_tags(arch)
        return (["DEFAULT"] + tags if tags else []) + ([BUNDLED] if backbone == BUNDLED_BACKBONE else [])
    enum = weights_enum(backbone)
    if enum is None:
        return []
    # Iterating an Enum skips aliases, so DEFAULT (an alias of the best member) is added by hand.
    return ["DEFAULT"] + [w.name for w in enum]


def _close(word: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(word, options, n=3, cutoff=0.6)


def backbone_problems(backbone: str, weights: str | None) -> list[str]:
    """Config validation for model.backbone and model.weights; an empty list when both are known."""
    if not is_known(backbone):
        names = _catalog()
        arch = timm_model_name(backbone)
        if arch is not None:
            model, _, tag = arch.partition(".")
            if tag and TIMM_PREFIX + model in _catalog_set():
                return [
                    f"model.backbone = {backbone!r}: the pretrained tag goes in model.weights; set "
                    f"model.backbone to {TIMM_PREFIX + model!r} and model.weights to {tag!r}"
                ]
            timm_names = [n for n in names if n.startswith(TIMM_PREFIX)]
            close = _close(backbone, timm_names)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            return [
                f"model.backbone = {backbone!r}: unknown; {hint}allowed: one of the {len(timm_names)} timm "
                f"models, named timm/<model> (e.g. {', '.join(_TIMM_EXAMPLES)})"
            ]
        close = _close(backbone, list(names))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        examples = ", ".join(e for e in _EXAMPLES if e in _catalog_set())
        return [
            f"model.backbone = {backbone!r}: unknown; {hint}allowed: one of the {len(names)} models, "
            f"torchvision's classification models (e.g. {examples}) or timm's as timm/<model> (e.g. "
            f"{', '.join(_TIMM_EXAMPLES[:2])})"
        ]
    if weights is None:
        return []
    allowed = weight_names(backbone)
    if not allowed:
        return [
            f"model.weights = {weights!r}: {backbone} has no pretrained weights; use null for random init "
            "or import a weights file (model.weights_file)"
        ]
    if weights not in allowed:
        close = _close(weights, allowed) or [a for a in allowed if a.lower() == str(weights).lower()]
        hint = f"; did you mean {close[0]}?" if close else ""
        return [
            f"model.weights = {weights!r}: not a weight of {backbone}; allowed: {', '.join(allowed)} "
            f"or null for random init{hint}"
        ]
    return []


def fixed_input_size(backbone: str) -> bool:
    """Whether the backbone takes only the input size it was built for (ViT-like: position embeddings)."""
    if vit_patch_size(backbone):
        return True
    arch = timm_model_name(backbone)
    if arch is None:
        return False
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an unknown name is reported by backbone_problems, not here
        return False
    return bool(cfg is not None and cfg.fixed_input_size)


def vit_patch_size(backbone: str) -> int | None:
    """The patch size of a torchvision ViT (vit_b_16 -> 16), None for other families."""
    if backbone.startswith("vit_"):
        return int(backbone.rsplit("_", 1)[1])
    return None
