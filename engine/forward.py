"""How a training batch goes through the model: on the run's device and memory format, at the project's
precision, through torch.compile when asked (falling back to eager, saying why, when compiling fails), and a
first batch the model cannot take turned into a message that names the setting to change."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.config import ConfigError, ProjectConfig
from engine.failures import is_out_of_memory


class Forward:
    def __init__(
        self,
        cfg: ProjectConfig,
        device: torch.device,
        channels_last: bool,
        log: Callable[[str], None],
        passes_through: Callable[[BaseException], bool],
    ):
        """passes_through: errors that are not the model's to explain (another process failed under it)."""
        self.cfg, self.device, self.channels_last, self.log = cfg, device, channels_last, log
        self.passes_through = passes_through
        self._compiled: Any = None  # torch.compile's callable for the training forward (train.compile)
        self._compiled_model: torch.nn.Module | None = None  # the module it compiled
        self._compile_tried = False  # its first batch ran (or failed and the run went back to eager)

    @property
    def compiled_module(self) -> torch.nn.Module | None:
        """The module whose forward runs compiled (None: eager, by choice or because compiling failed)."""
        return self._compiled_model if self._compiled is not None else None

    @property
    def compile_tried(self) -> bool:
        """The compiled forward has run its first batch (or failed, and the run went back to eager)."""
        return self._compile_tried

    def prepare(self, module: torch.nn.Module) -> None:
        """train.compile wraps the training forward of module (the model itself, saved and checkpointed, stays as
        it is; with the feature cache, module is the part after the cut)."""
        t = self.cfg.train
        auto = " (auto)" if t.channels_last is None else ""
        self.log(
            f"Precision {t.precision}, channels_last {'on' if self.channels_last else 'off'}{auto}, "
            f"torch.compile {'on' if t.compile else 'off'}"
        )
        if t.compile and self._compiled is None and not self._compile_tried:
            self._compiled_model = module
            try:
                self._compiled = torch.compile(module)
            except Exception as exc:  # torch.compile itself refuses (an unsupported Python, a missing backend)
                self._compile_failed(exc)

    def _compile_failed(self, exc: BaseException) -> None:
        self._compiled = None
        self._compile_tried = True
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
        self.log(f"torch.compile failed ({reason}); training continues without compiling (eager)")

    def __call__(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The training forward of `model`: compiled when train.compile is on and compiling worked."""
        if self._compiled is None or model is not self._compiled_model:
            return model(inputs)
        if self._compile_tried:
            return self._compiled(inputs)
        try:
            # Compile the backward now too (it is otherwise compiled lazily at loss.backward(), out of this try).
            with _eager_backward_lowering():
                outputs = self._compiled(inputs)
        except Exception as exc:  # no C compiler, an operation the compiler does not support, ...
            if self.passes_through(exc):
                raise
            self._compile_failed(exc)
            return model(inputs)
        self._compile_tried = True
        return outputs

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.cfg.train.precision
        if precision == "fp32" or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch's inputs on the run's device, channels-last when the model is (images only: 4-D)."""
        if self.channels_last and inputs.dim() == 4:
            return inputs.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return inputs.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def first_batch_guard(self, inputs: torch.Tensor, first: bool) -> Iterator[None]:
        """A model that cannot take the project's inputs fails on its first batch: say which setting to change."""
        if not first:
            yield
            return
        try:
            yield
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            if is_out_of_memory(exc) or self.passes_through(exc):  # the trainer names these
                raise
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shape = "x".join(str(d) for d in inputs.shape)
            hint = (
                "loader.batch_size >= 2 (BatchNorm needs more than one sample per batch)"
                if "more than 1 value per channel" in line
                else "data.image_size, data.keep_aspect or the backbone"
            )
            raise ConfigError(
                [f"{self.cfg.model.backbone} cannot train on batches of shape {shape} ({line}); change {hint}"]
            ) from exc


def _eager_backward_lowering() -> contextlib.AbstractContextManager[Any]:
    """While compiling, compile the backward graph with the forward, so that its failure shows at once."""
    try:
        from torch._functorch import config as functorch_config

        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    except Exception:  # a PyTorch without the switch: the backward compiles lazily
        return contextlib.nullcontext()
