"""What every adapter callback does, whatever the method: :class:`AdapterCallback`.

Where in ``Trainer.fit`` things happen (and why there):

1. ``setup``: the config's plan (:func:`lightning_zenft.inject.plan_adapters`) is applied: target modules are swapped
   for adapter modules and everything else is frozen, before checkpoint restore, before the precision plugin
   converts the module and before a sharding strategy wraps it. A module that builds its layers in
   ``configure_model`` gets its adapters right after that hook instead. A model that already holds adapters (validate
   after fit, a second Trainer) is adopted when they are exactly what the plan makes, and refused otherwise.
2. ``configure_optimizers`` runs after that, so ``AdamW(self.parameters())`` already sees frozen base weights with
   ``requires_grad=False``. At ``on_fit_start`` the callback removes those frozen parameters from every optimizer
   (they would never step, but some optimizers still allocate state or apply weight decay to them) and checks that
   every trained tensor is optimized.
3. Checkpoints keep only the trained parameters (adapters, plus any bias/norm/module the config trains) and the
   callback's state (config, targets, RNG state), not the frozen base. ``ckpt_path=`` restores them into a freshly
   injected model (fit, validate, test or predict) with Lightning's strict loading, which only forgives the absent
   frozen tensors. Before the model's tensors load, the checkpoint's adapter settings are compared with this
   callback's, so a changed rank or method says so instead of listing tensor keys. Under the sharding strategies of
   :mod:`lightning_zenft.strategies` the module is marked trained-only
   (:func:`~lightning_zenft.strategies.checkpoints.mark_trained_only`): frozen tensors are then never gathered or
   written, and sharded checkpoints without them load strictly.

A method's callback is a thin subclass naming its config class; its constructor takes the config's fields as keyword
arguments (the signature is generated from the config, so ``LightningCLI``/YAML validate them) plus
``save_full_state_dict``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.adapters import find_adapters
from lightning_zenft.adapters._base import is_adaptable_linear
from lightning_zenft.config import AdapterConfig
from lightning_zenft.inject import AdapterPlan, apply_plan, count_parameters, plan_adapters
from lightning_zenft.strategies.checkpoints import mark_trained_only

CHECKPOINT_KEY = "zenft_adapters"
"""Key of a Lightning checkpoint naming the adapter callbacks that wrote it (so a run without them can say so)."""


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` that train (``requires_grad``): what an optimizer over an adapted model needs."""
    return (p for p in module.parameters() if p.requires_grad)


class AdapterCallback(Callback):
    """Adapters of one method on the LightningModule's model: injection, optimizer pruning, adapter-only checkpoints.

    Subclasses set :attr:`config_cls` (and :attr:`fixed_config` for values the subclass decides, e.g. DoRA's
    ``use_dora=True``); the constructor takes the config's fields as keyword arguments.

    Args:
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.
        **config: the fields of :attr:`config_cls`.
    """

    config_cls: ClassVar[type[AdapterConfig]]
    fixed_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, save_full_state_dict: bool = False, **config: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            known = sorted(fields - set(self.fixed_config))
            raise TypeError(
                f"{type(self).__name__} got unknown arguments {unknown}; it takes {known} and save_full_state_dict."
            )
        fixed = sorted(set(config) & set(self.fixed_config))
        if fixed:
            raise TypeError(f"{type(self).__name__} sets {fixed} itself; use the callback of the other variant.")
        self.config = self.config_cls(**config, **self.fixed_config)
        if not isinstance(save_full_state_dict, bool):
            raise TypeError(f"save_full_state_dict={save_full_state_dict!r} must be True or False.")
        self.save_full_state_dict = save_full_state_dict
        self.targets: list[str] = []
        self.trainable_params = 0
        self.total_params = 0
        self._trainable_keys: set[str] = set()
        self._deferred = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__ and "config_cls" in cls.__dict__:
            _give_config_signature(cls)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_modules=str(self.config.target_modules))

    # ------------------------------------------------------------------ method hooks
    def resolve_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AdapterConfig | None:
        """The config to inject with, once values such as ``r="auto"`` are resolved; None when they cannot be resolved
        before a checkpoint is read (then injection waits for the checkpoint's saved config)."""
        return self.config

    def after_injection(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: B027 - optional
        """Work a method does once its modules are in place (LoRA's LoftQ start needs the precision plugin)."""

    def config_from_checkpoint(self, saved: dict[str, Any]) -> AdapterConfig:
        """This callback's config completed with the values a checkpoint resolved (e.g. the rank ``"auto"`` chose)."""
        return self.config

    # ------------------------------------------------------------------ injection
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _watch_checkpoint_loading(pl_module)
        if self.targets:
            return  # this callback's adapters are in place (e.g. validate after fit)
        existing = list(find_adapters(pl_module))
        if existing:
            self._adopt(pl_module)
            return
        if not _has_linear_layers(pl_module) and _overrides_configure_model(pl_module):
            self._inject_after_configure_model(trainer, pl_module)
            return
        self._inject(trainer, pl_module)

    def _adopt(self, pl_module: pl.LightningModule) -> None:
        """Take over adapters injected earlier (another Trainer's callback) if they are exactly what this plan makes."""
        name = type(self).__name__
        try:
            plan = plan_adapters(pl_module, self.config, include_adapted=True)
            problems = plan.mismatches(pl_module)
        except ValueError as err:
            plan, problems = None, [str(err)]
        if problems:
            adapted = [n for n, _ in find_adapters(pl_module)]
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise RuntimeError(
                f"{name}(target_modules={self.config.target_modules!r}): {type(pl_module).__name__} already holds "
                f"adapters that differ from this callback's plan ({len(adapted)} layers adapted, e.g. {adapted[:2]}): "
                f"{shown}. One adapter callback adapts a model: to adapt more layers, give one callback "
                "all of them (e.g. target_modules=['q_proj', 'up_proj'] or 'all-linear'); to change settings, start "
                "from a model without adapters (lightning_zenft.unload_adapters)."
            )
        assert plan is not None
        self.targets = plan.names
        self._record(pl_module)

    def _record(self, pl_module: pl.LightningModule) -> None:
        self.trainable_params, self.total_params = count_parameters(pl_module)
        self._trainable_keys = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        if not self.save_full_state_dict:
            _accept_adapter_only_state(pl_module, self._trainable_keys)
            mark_trained_only(pl_module, self._trainable_keys)

    def _inject_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        user_hook: Callable[[], None] = pl_module.configure_model

        def configure_model_then_inject() -> None:
            user_hook()
            if not any(True for _ in find_adapters(pl_module)):
                self._inject(trainer, pl_module)

        pl_module.configure_model = configure_model_then_inject  # type: ignore[method-assign]

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.resolve_config(trainer, pl_module)
        if config is None and trainer.strategy.restore_checkpoint_after_setup:
            raise RuntimeError(
                f"{type(self).__name__}: {self._unresolved()}, and {type(trainer.strategy).__name__} reads checkpoints "
                "only after it has sharded the model, too late to inject adapters from the checkpoint's settings. Give "
                "the settings explicitly (as the run that wrote the checkpoint resolved them)."
            )
        if config is None:
            self._deferred = True  # injected from the checkpoint's saved config, before its tensors load
            return
        self.config = config
        self._apply(pl_module, plan_adapters(pl_module, config))
        self.after_injection(trainer, pl_module)

    def _apply(self, pl_module: pl.LightningModule, plan: AdapterPlan) -> None:
        apply_plan(pl_module, plan)
        self.targets = plan.names
        self._deferred = False
        self._record(pl_module)
        share = 100 * self.trainable_params / max(self.total_params, 1)
        rank_zero_info(
            f"{type(self).__name__}: {len(self.targets)} layers adapted; trainable params: {self.trainable_params:,} "
            f"|| all params: {self.total_params:,} || trainable%: {share:.4f}"
        )

    # ------------------------------------------------------------------ checkpoint checks, before tensors load
    def check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Compare a checkpoint's adapter state with this callback before the model's tensors load (see the module
        docstring); inject now if injection waited for the checkpoint's saved config."""
        from lightning_zenft.precision.resume import check_resume_precision

        check_resume_precision(pl_module.trainer, checkpoint)  # a 4-bit run's adapters need the 4-bit base
        states = checkpoint.get("callbacks") or {}
        saved = states.get(self.state_key)
        name = type(self).__name__
        if saved is None:
            writers = {k: v for k, v in states.items() if _is_adapter_state(v)}
            if len(writers) == 1 and next(iter(writers)).startswith(f"{type(self).__qualname__}{{"):
                saved = next(iter(writers.values()))  # same callback class, other targets: say what differs
            elif writers or checkpoint.get(CHECKPOINT_KEY):
                raise RuntimeError(
                    f"the checkpoint's adapter callbacks {list(writers) or checkpoint[CHECKPOINT_KEY]} differ from "
                    f"this Trainer's {self.state_key}. Resume with the callback and settings the checkpoint was "
                    "written with."
                )
            elif self._deferred:
                raise RuntimeError(
                    f"{name}: the checkpoint holds no {name} state to take the resolved settings from "
                    f"({self._unresolved()}); give them explicitly."
                )
            else:
                return  # a checkpoint of a model without adapters (e.g. full fine-tuning): loaded into the base as is
        if self._deferred:
            self.config = self.config_from_checkpoint(saved)
            self._apply(pl_module, plan_adapters(pl_module, self.config))
        self._compare_config(saved.get("config", {}))

    def _unresolved(self) -> str:
        return "its settings are resolved when fitting starts"

    def _compare_config(self, saved: dict[str, Any]) -> None:
        current = self.config.to_dict()
        differ = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
        if differ:
            raise RuntimeError(
                f"{type(self).__name__} settings differ from the checkpoint's (saved, now): {differ}. Resume with the "
                "settings the checkpoint was written with."
            )

    # ------------------------------------------------------------------ optimizer
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_injected()
        removed = 0
        optimized: set[int] = set()
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                kept = [p for p in group["params"] if p.requires_grad]
                removed += len(group["params"]) - len(kept)
                group["params"] = kept
                optimized.update(id(p) for p in kept)
        if removed:
            rank_zero_info(f"{type(self).__name__}: removed {removed} frozen parameter tensors from the optimizer.")
        missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in optimized]
        if trainer.optimizers and missing:
            raise RuntimeError(
                f"the optimizer does not hold {len(missing)} of the {len(self._trainable_keys)} trained tensors "
                f"(the adapter parameters and what else the config trains; e.g. {missing[:3]}). Build it in "
                "`configure_optimizers` from `lightning_zenft.trainable_parameters(self)` (or `self.parameters()`); "
                "it runs after the adapters are injected."
            )
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {"zenft/trainable_params": self.trainable_params, "zenft/total_params": self.total_params}
            )

    def _require_injected(self) -> None:
        if self._deferred:
            raise RuntimeError(
                f"{type(self).__name__}: no adapters were injected: {self._unresolved()}, and no checkpoint holding "
                "them was given (ckpt_path=...)."
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_injected()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_injected()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_injected()

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, []).append(self.state_key)
        if self.save_full_state_dict:
            return
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self._trainable_keys}

    @override
    def state_dict(self) -> dict[str, Any]:
        # The RNG state makes adapter dropout after a resume draw the same masks as an uninterrupted run would.
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"config": self.config.to_dict(), "targets": list(self.targets), "rng": rng}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._compare_config(state_dict.get("config", {}))
        if state_dict.get("targets") and list(state_dict["targets"]) != self.targets:
            raise RuntimeError("the checkpoint's adapted layers differ from this model's; was the model changed?")
        rng = state_dict.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _is_adapter_state(state: object) -> bool:
    return isinstance(state, dict) and "config" in state and "targets" in state and "rng" in state


def _watch_checkpoint_loading(pl_module: pl.LightningModule) -> None:
    """Run every adapter callback's :meth:`AdapterCallback.check_checkpoint` before the model's tensors load.

    Lightning calls the LightningModule's ``on_load_checkpoint`` right before ``load_state_dict``; the instance gets a
    wrapper (once) that calls the module's own hook first, then the checks of the Trainer's adapter callbacks.
    """
    if getattr(pl_module, "_zenft_checkpoint_watch", False):
        return
    user_hook = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        user_hook(checkpoint)
        trainer = pl_module._trainer
        for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
            if isinstance(callback, AdapterCallback):
                callback.check_checkpoint(pl_module, checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    pl_module._zenft_checkpoint_watch = True


def _accept_adapter_only_state(pl_module: pl.LightningModule, trainable: set[str]) -> None:
    """Let ``load_state_dict`` (strict, as Lightning calls it for ``ckpt_path=``) accept adapter-only checkpoints.

    Missing keys of frozen tensors are dropped from the strict check; a missing trained tensor or any unexpected key
    still fails loudly. Registered once per module.
    """
    if getattr(pl_module, "_zenft_adapter_only_hook", None) is not None:
        return
    frozen = {k for k in pl_module.state_dict() if k not in trainable}

    def drop_frozen_missing(module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

    pl_module._zenft_adapter_only_hook = pl_module.register_load_state_dict_post_hook(drop_frozen_missing)


def _has_linear_layers(module: nn.Module) -> bool:
    return any(is_adaptable_linear(m) for m in module.modules())


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).configure_model is not pl.LightningModule.configure_model


def _give_config_signature(cls: type[AdapterCallback]) -> None:
    """Give ``cls`` an ``__init__`` whose signature lists its config's fields, so ``LightningCLI`` and ``inspect``
    see real, typed arguments (``jsonargparse`` validates YAML against them)."""
    base_init = AdapterCallback.__init__

    def __init__(self: AdapterCallback, **kwargs: Any) -> None:  # noqa: N807
        base_init(self, **kwargs)

    hints = typing.get_type_hints(cls.config_cls)
    own = set(cls.config_cls.__dict__.get("__annotations__", {}))
    fields = sorted(dataclasses.fields(cls.config_cls), key=lambda f: f.name not in own)  # the method's own first
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in fields:
        if f.name in cls.fixed_config or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, keyword, default=default, annotation=hints[f.name]))
    params.append(inspect.Parameter("save_full_state_dict", keyword, default=False, annotation=bool))
    __init__.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = cls.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]


__all__ = ["CHECKPOINT_KEY", "AdapterCallback", "trainable_parameters"]
