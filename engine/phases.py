"""A run in phases (train.phases): each phase as the plain single-phase project it trains, and where phases begin.

A phase is trained exactly as a project whose model.freeze..., optimizer.lr, schedule.name, data.augment and
optimizer.layer_lr_decay and train.epochs are the phase's: plan_phases() builds those projects once, so the trainer, the feature cache and
the log read ordinary settings and no code below asks "which phase am I in?" beyond the trainer's phase change.
A run without phases is one phase whose project is the project itself (not a copy), so it trains as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import AugmentConfig, PhaseConfig, ProjectConfig
from engine.settings import Applies
from engine.transforms import augmentations_on


@dataclass(frozen=True)
class Phase:
    index: int  # 0-based
    count: int  # phases in the run
    name: str
    epochs: int
    cfg: ProjectConfig  # the project this phase trains (train.epochs = its epochs, no phases of its own)

    @property
    def lr(self) -> float:
        return self.cfg.optimizer.lr

    @property
    def augmented(self) -> bool:
        return bool(augmentations_on(self.cfg.data.augment))

    def title(self) -> str:
        """'phase 2/3 (fine-tune)', as the log and the plots name it."""
        return f"phase {self.index + 1}/{self.count}" + (f" ({self.name})" if self.name else "")


def plan_phases(cfg: ProjectConfig) -> list[Phase]:
    """The phases of a (validated) project, each with the project it trains."""
    if not cfg.train.phases:
        return [Phase(0, 1, "", cfg.train.epochs, cfg)]
    out: list[Phase] = []
    lr = cfg.optimizer.lr
    n = len(cfg.train.phases)
    for i, spec in enumerate(cfg.train.phases):
        if spec.lr is not None:
            lr = spec.lr
        elif spec.lr_factor is not None:
            lr = lr * spec.lr_factor
        else:
            lr = cfg.optimizer.lr
        phase_cfg = cfg.copy()
        m = phase_cfg.model
        if spec.freeze is not None:
            m.freeze = spec.freeze
            m.freeze_up_to = spec.freeze_up_to if spec.freeze == "up_to" else None
        elif spec.freeze_up_to is not None:
            m.freeze_up_to = spec.freeze_up_to
        if spec.freeze_prefixes is not None:
            m.freeze_prefixes = list(spec.freeze_prefixes)
        if spec.unfreeze_prefixes is not None:
            m.unfreeze_prefixes = list(spec.unfreeze_prefixes)
        phase_cfg.optimizer.lr = lr
        if spec.layer_lr_decay is not None:
            phase_cfg.optimizer.layer_lr_decay = spec.layer_lr_decay
        if spec.schedule is not None:
            phase_cfg.schedule.name = spec.schedule
        if spec.augment is False:
            phase_cfg.data.augment = AugmentConfig()
        phase_cfg.train.epochs = spec.epochs
        phase_cfg.train.phases = []
        out.append(Phase(i, n, spec.name, spec.epochs, phase_cfg))
    return out


def rule_holds(cfg: ProjectConfig, rule: Applies) -> bool:
    """Whether a setting's `applies` rule holds for the project or, when it trains in phases, in any phase: a
    phase's own schedule or freeze brings the settings that go with it into use (schedule.eta_min under a phase's
    cosine schedule while the project's own is none)."""
    if rule.holds(cfg):
        return True
    return bool(cfg.train.phases) and any(rule.holds(phase.cfg) for phase in plan_phases(cfg))


def phase_at(phases: Sequence[Phase], starts: Sequence[int], done: int) -> int:
    """The phase the epoch after `done` finished epochs belongs to; starts[k]: epochs finished before phase k began
    (phases that have not begun yet follow the last begun one back to back)."""
    k = len(starts) - 1
    end = starts[k] + phases[k].epochs
    while done >= end and k + 1 < len(phases):
        k += 1
        end += phases[k].epochs
    return k


def planned_epochs(phases: Sequence[Phase], starts: Sequence[int]) -> int:
    """The run's length: the last begun phase's start and the epochs of it and of every phase after it."""
    k = len(starts) - 1
    return starts[k] + sum(p.epochs for p in phases[k:])


# The Fine-tune preset's shape: many cheap head epochs on cached features, then the top blocks for a short while.
# Both phases are unaugmented, so phase 1's one pass over the data also keeps phase 2's features
# (engine.feature_cache.NextPhase) and phase 2 trains only the top blocks. On the bundled digits an augmented
# phase 2 (one cycle at a fifth of the rate, layer-wise decay 0.7) lost accuracy (0.961 -> 0.930), and a layer-wise
# decay of 0.7 on the unaugmented one ended at 0.978 against 0.986 without it (README, "Training in phases").
HEAD_EPOCHS = 8
TUNE_EPOCHS = 3
TOP_BLOCKS = 2  # blocks of the model's own structure unfrozen in phase 2
TUNE_LR_FACTOR = 0.1  # phase 2's head rate against phase 1's: the head is trained already


def model_blocks(cfg: ProjectConfig) -> list[str]:
    """The backbone's blocks, bottom to top (engine.freezing.block_units), from its structure on the meta device:
    no weights are read and no memory is taken, so it is quick enough for a button."""
    import torch

    from engine.backbones import build_model
    from engine.freezing import block_units

    with torch.device("meta"):
        built = build_model(cfg.model.model_copy(update={"weights": None, "weights_file": None}), 2)
    return block_units(built.model, built.head_name)


def fine_tune_preset(cfg: ProjectConfig) -> dict[str, object]:
    """The Fine-tune recipe for a project, as field values: phase 1 trains the head alone on cached features
    (no augmentation, HEAD_EPOCHS cheap epochs, at optimizer.lr: the learning-rate finder's suggestion); phase 2
    unfreezes the top TOP_BLOCKS blocks for TUNE_EPOCHS epochs at TUNE_LR_FACTOR of that rate with a cosine
    schedule, also unaugmented, so that it trains on features kept from phase 1's pass.

    Raises ValueError when the backbone has too few blocks to unfreeze only the top ones.
    """
    blocks = model_blocks(cfg)
    if len(blocks) <= TOP_BLOCKS:
        raise ValueError(
            f"{cfg.model.backbone} has {len(blocks)} block(s) the preset can find, too few to unfreeze only the top "
            f"{TOP_BLOCKS}; set the phases by hand"
        )
    tune: dict[str, object] = {
        "name": "fine-tune",
        "epochs": TUNE_EPOCHS,
        "freeze": "up_to",
        "freeze_up_to": blocks[-TOP_BLOCKS - 1],
        "lr_factor": TUNE_LR_FACTOR,
        "schedule": "cosine",
        "augment": False,
    }
    head = {"name": "head", "epochs": HEAD_EPOCHS, "freeze": "head_only", "augment": False, "schedule": "none"}
    return {"train.phases": [PhaseConfig.model_validate(head), PhaseConfig.model_validate(tune)]}
