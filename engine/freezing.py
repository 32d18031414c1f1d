"""Which parameters train: freeze presets and prefixes, frozen BatchNorm, per-part learning rates, the layer tree."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.config import ConfigError, ModelConfig


@dataclass
class LayerInfo:
    name: str  # dotted module name; "" for the whole model
    type: str  # class name, e.g. Conv2d
    depth: int  # 0 for the whole model, 1 for its children, ...
    params: int  # parameter elements, children included
    trainable: int  # of those, how many have requires_grad
    output_shape: tuple | None  # from one dry forward of a batch of 1; None when unknown


def _numel(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    total = trainable = 0
    for p in params:
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def _first_shape(out: Any) -> tuple | None:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):  # namedtuples too (Inception, MultiheadAttention)
        for item in out:
            if isinstance(item, torch.Tensor):
                return tuple(item.shape)
    return None


def layer_tree(model: nn.Module, input_size: tuple[int, ...] = (3, 224, 224)) -> list[LayerInfo]:
    """Every module with its parameter counts and output shape, in registration order."""
    shapes: dict[str, tuple | None] = {}
    modes = {m: m.training for m in model.modules()}
    hooks = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            shapes.setdefault(name, _first_shape(output))  # a module called twice keeps its first shape

        return hook

    try:
        for name, module in model.named_modules():
            hooks.append(module.register_forward_hook(hook_for(name)))
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        model.eval()  # eval: BatchNorm running stats must not move, and dropout is irrelevant
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    except Exception:
        shapes.clear()  # the input size does not suit the model: the tree is still worth showing
    finally:
        for h in hooks:
            h.remove()
        # Per module, since frozen BatchNorm layers may be in eval while the rest trains.
        for m, training in modes.items():
            m.training = training

    out = []
    for name, module in model.named_modules():
        total, trainable = _numel(module.parameters())
        out.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                depth=0 if not name else name.count(".") + 1,
                params=total,
                trainable=trainable,
                output_shape=shapes.get(name),
            )
        )
    return out


@dataclass
class FreezeSummary:
    total: int  # parameter elements
    trainable: int
    frozen: int


def _matches(name: str, prefix: str) -> bool:
    # By dotted name component: "layer1" covers "layer1.0.conv1" but not "layer10".
    return name == prefix or name.startswith(prefix + ".")


def _unknown(field: str, value: str, model: nn.Module, backbone: str, what: str) -> ValueError:
    top = [n for n, _ in model.named_children()]
    shown = ", ".join(top) if len(top) <= 12 else ", ".join(top[:6]) + ", ..., " + ", ".join(top[-3:])
    names = [n for n, _ in model.named_modules() if n]
    nested = next((n for n in names if "." in n), None)
    shown += f" (nested ones are named with dots, such as {nested})" if nested else ""
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError([f"{field} = {value!r}: {what} in {backbone}; modules include {shown}{hint}"])


def apply_freeze(
    model: nn.Module, model_cfg: ModelConfig, head_name: str, *, freeze_backbone: bool = False
) -> FreezeSummary:
    """Set requires_grad from the config: preset, then freeze_prefixes, then unfreeze_prefixes.

    freeze_backbone (an lr multiplier of 0) freezes everything but the head at the end, so frozen
    BatchNorm and the backward pass treat it as frozen too. Raises ConfigError naming the field
    when a module name or prefix matches nothing in this model (validation cannot know module names).
    """
    backbone = model_cfg.backbone
    params = list(model.named_parameters())
    modules = [n for n, _ in model.named_modules()]
    for _, p in params:
        p.requires_grad_(True)

    if model_cfg.freeze == "head_only":
        for n, p in params:
            if not _matches(n, head_name):
                p.requires_grad_(False)
    elif model_cfg.freeze == "up_to":
        target = model_cfg.freeze_up_to or ""
        if not target or target not in modules:
            raise _unknown("model.freeze_up_to", target, model, backbone, "no such module")
        # named_modules() is a pre-order walk, so the modules before the target are its ancestors and
        # everything that precedes it; their own (non-recursive) parameters are frozen. That includes
        # direct parameters of ancestors (ViT's class_token, encoder.pos_embedding), used before the
        # target runs. A target without parameters (a pooling layer) still freezes what precedes it.
        for n, module in model.named_modules():
            if n == target:
                for p in module.parameters():
                    p.requires_grad_(False)
                break
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)

    names = set(modules) | {n for n, _ in params}  # a prefix may name a module or one parameter (fc.bias)
    for field, prefixes, trainable in (
        ("model.freeze_prefixes", model_cfg.freeze_prefixes, False),
        ("model.unfreeze_prefixes", model_cfg.unfreeze_prefixes, True),
    ):
        for i, prefix in enumerate(prefixes):
            if not prefix or not any(_matches(n, prefix) for n in names):
                raise _unknown(f"{field}[{i}]", prefix, model, backbone, "matches no module")
            for n, p in params:
                if _matches(n, prefix):
                    p.requires_grad_(trainable)

    if freeze_backbone:
        for n, p in params:
            if not _matches(n, head_name):
                p.requires_grad_(False)
    total, trainable_count = _numel(p for _, p in params)
    return FreezeSummary(total=total, trainable=trainable_count, frozen=total - trainable_count)


def frozen_batchnorm_modules(model: nn.Module) -> list[str]:
    """BatchNorm layers whose parameters are all frozen (running stats should freeze with them)."""
    modules = dict(model.named_modules())
    out = []
    for name, module in modules.items():
        if not isinstance(module, _BatchNorm):
            continue
        owner = module
        parent = name
        # affine=False norms have no parameters of their own; they follow the nearest enclosing
        # module that has some.
        while next(owner.parameters(), None) is None and owner is not model:
            parent = parent.rpartition(".")[0]
            owner = modules[parent]
        if not any(p.requires_grad for p in owner.parameters()):
            out.append(name)
    return out


def set_frozen_batchnorm_eval(model: nn.Module, names: list[str]) -> None:
    """Put the named BatchNorm layers in eval mode; call after every model.train()."""
    for name in names:
        model.get_submodule(name).eval()


def block_units(model: nn.Module, head_name: str) -> list[str]:
    """The model's own blocks, bottom to top, found from the module tree alone (no table per family).

    A run is a sequence of consecutive sibling modules of one class (children without parameters are skipped, the
    head and its containers left out). The blocks are the shallowest run of at least three that holds at least a
    quarter of the parameters (the larger one on a tie): ResNet's layer1..layer4, torchvision EfficientNet's and
    ConvNeXt's features.N, timm EfficientNet's blocks.N and ConvNeXt's stages.N, ViT's encoder blocks. A model
    without one takes its largest run of two; none at all gives no blocks.
    """
    total = sum(p.numel() for p in model.parameters())
    runs: list[tuple[int, int, list[str]]] = []  # (depth, parameters, names)

    def close(run: list[tuple[str, nn.Module]]) -> None:
        if len(run) >= 2:
            size = sum(p.numel() for p in {id(p): p for _, m in run for p in m.parameters()}.values())
            runs.append((run[0][0].count("."), size, [n for n, _ in run]))

    for name, module in model.named_modules():
        run: list[tuple[str, nn.Module]] = []
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if next(child.parameters(), None) is None:
                continue  # an activation or pooling between blocks does not break their run
            if _matches(head_name, full):
                close(run)
                run = []
            elif run and type(child) is type(run[-1][1]):
                run.append((full, child))
            else:
                close(run)
                run = [(full, child)]
        close(run)
    blocks = [r for r in runs if len(r[2]) >= 3 and 4 * r[1] >= total]
    if blocks:
        return min(blocks, key=lambda r: (r[0], -r[1]))[2]
    return max(runs, key=lambda r: (r[1], -r[0]))[2] if runs else []


@dataclass(frozen=True)
class LrGroup:
    """One optimizer parameter group: its name, its rate as a factor of optimizer.lr, and its parameters' names."""

    name: str
    factor: float
    params: tuple[str, ...]


def _lr_mult_prefix(name: str, lr_mult: dict[str, float]) -> str | None:
    """The most specific optimizer.lr_mult key that covers a parameter (the longest matching prefix)."""
    found = [k for k in lr_mult if _matches(name, k)]
    return max(found, key=len) if found else None


def lr_plan(
    model: nn.Module,
    head_name: str,
    backbone_lr_mult: float = 1.0,
    layer_lr_decay: float = 1.0,
    lr_mult: dict[str, float] | None = None,
    *,
    backbone: str = "",
) -> list[LrGroup]:
    """Every parameter's learning rate as a factor of optimizer.lr, in the groups the optimizer gets; head first.

    The head trains at 1; the backbone at backbone_lr_mult, and with layer_lr_decay < 1 each block of the model's
    own structure (block_units) down from the head at layer_lr_decay times the one above it: the modules after
    the last block (a final norm or 1x1 convolution) at the head's level, the top block one step down, the stem
    (everything before the first block) one step below the bottom block. optimizer.lr_mult multiplies the
    parameters under each prefix (the longest matching prefix wins) and splits them into a group of their own.
    Frozen parameters are included (the caller leaves them out); with both at their defaults the groups are the
    plain "head" and "backbone". Raises ConfigError naming an lr_mult key that matches nothing.
    """
    lr_mult = dict(lr_mult or {})
    params = [n for n, _ in model.named_parameters()]
    names = {n for n, _ in model.named_modules()} | set(params)
    for key in lr_mult:
        if not key or not any(_matches(n, key) for n in names):
            raise _unknown(
                f"optimizer.lr_mult[{key!r}]", key, model, backbone or type(model).__name__, "matches no module"
            )
    units = block_units(model, head_name) if layer_lr_decay != 1 else []
    first = next((i for i, n in enumerate(params) if any(_matches(n, u) for u in units)), len(params))

    def level(index: int, name: str) -> tuple[str, float]:
        """The parameter's block (a group name) and its factor before lr_mult."""
        if _matches(name, head_name):
            return "head", 1.0
        if not units:
            return "backbone", backbone_lr_mult
        for k, unit in enumerate(units):
            if _matches(name, unit):
                return unit, backbone_lr_mult * layer_lr_decay ** (len(units) - k)
        if index < first:
            return "stem", backbone_lr_mult * layer_lr_decay ** (len(units) + 1)
        return "top", backbone_lr_mult  # after the first block and in none: the head's level

    grouped: dict[str, tuple[float, list[str]]] = {}
    for index, name in enumerate(params):
        group, factor = level(index, name)
        prefix = _lr_mult_prefix(name, lr_mult)
        if prefix is not None:
            group, factor = f"{group}:{prefix}", factor * lr_mult[prefix]
        grouped.setdefault(group, (factor, []))[1].append(name)
    order = sorted(grouped, key=lambda g: g.split(":")[0] != "head")  # stable: the head's groups first
    return [LrGroup(g, grouped[g][0], tuple(grouped[g][1])) for g in order]


def param_groups(
    model: nn.Module,
    head_name: str,
    lr: float,
    backbone_lr_mult: float,
    *,
    layer_lr_decay: float = 1.0,
    lr_mult: dict[str, float] | None = None,
    backbone: str = "",
) -> list[dict]:
    """Optimizer groups of trainable parameters, each at lr times its factor from lr_plan (head first).

    With backbone_lr_mult == 0 the backbone groups are left out altogether rather than given lr 0, so the
    backbone is effectively frozen: a scheduler that sets every group's lr (OneCycleLR's max_lr) cannot
    revive it, and it costs no optimizer state. Its requires_grad stays as it was; freeze it as well to
    save the backward pass.
    """
    by_name = dict(model.named_parameters())
    groups = []
    for group in lr_plan(model, head_name, backbone_lr_mult, layer_lr_decay, lr_mult, backbone=backbone):
        trainable = [by_name[n] for n in group.params if by_name[n].requires_grad]
        if trainable and group.factor > 0:
            groups.append({"params": trainable, "lr": lr * group.factor, "name": group.name})
    return groups


def freeze_spec(model: nn.Module) -> dict:
    """The frozen parameter names, as a plain value for checkpoints."""
    return {"frozen": [n for n, p in model.named_parameters() if not p.requires_grad]}
