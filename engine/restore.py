"""The trained model a checkpoint describes, rebuilt from the checkpoint's own project and tensors."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine.backbones import build_model, preprocess_for
from engine.checkpoints import CheckpointError
from engine.config import ProjectConfig, from_dict

if TYPE_CHECKING:
    from torch import nn

    from engine.transforms import Preprocess


def restore_model(
    ckpt: dict[str, Any], source: str | os.PathLike | None = None
) -> tuple[nn.Module, ProjectConfig, list[str], Preprocess]:
    """The trained model a checkpoint describes, rebuilt from its config and loaded strictly, in eval mode.

    source (the file it came from) is named in the errors.

    Returns (model, config, class_names, preprocess). No pretrained weights are fetched: the
    checkpoint's own tensors replace them.
    """
    for key in ("model_state_dict", "config", "class_names"):
        if key not in ckpt:
            raise CheckpointError(
                f"this file has no '{key}': it is not a Model Workbench checkpoint "
                "(a bare state dict can be used as model.weights_file instead)"
            )
    cfg = from_dict(ckpt["config"], check_paths=False)
    pre = preprocess_for(cfg.model, cfg.data)
    model_cfg = cfg.copy().model
    model_cfg.weights = None
    model_cfg.weights_file = None
    built = build_model(model_cfg, len(ckpt["class_names"]), image_size=pre.crop_size)
    state = ckpt["model_state_dict"]
    which = f"checkpoint {source}" if source else "the checkpoint"
    if not isinstance(state, dict):
        raise CheckpointError(f"{which}: its model_state_dict is a {type(state).__name__}, not a state dict")
    try:
        built.model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{which}: its weights do not fit {cfg.model.backbone} with {len(ckpt['class_names'])} "
            f"outputs: {misfit(built.model.state_dict(), state)}"
        ) from None
    built.model.eval()
    return built.model, cfg, list(ckpt["class_names"]), pre


def misfit(own: dict[str, Any], incoming: dict[str, Any]) -> str:
    """One line saying how a state dict differs from a model's (torch's own message lists every key)."""
    missing = [k for k in own if k not in incoming]
    unexpected = [k for k in incoming if k not in own]
    shaped = [
        (k, tuple(getattr(incoming[k], "shape", ())), tuple(own[k].shape))
        for k in own
        if k in incoming and tuple(getattr(incoming[k], "shape", ())) != tuple(own[k].shape)
    ]
    parts = []
    if shaped:
        k, theirs, ours = shaped[0]
        parts.append(
            f"{len(shaped)} tensor(s) of another shape, e.g. {k} (file {'x'.join(map(str, theirs))}, "
            f"model {'x'.join(map(str, ours))})"
        )
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model, e.g. {unexpected[0]}")
    return "; ".join(parts) or "the tensors do not load"
