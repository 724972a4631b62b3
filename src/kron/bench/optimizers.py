"""The optimizers the suite compares, how each is built and which learning rates it is swept over.

Every optimizer is a :class:`OptimizerSpec`. A run uses one *config*: a spec plus one learning
rate from its grid (``None`` = the optimizer's own default). Sweep protocol (``runner.plan``):
every grid value runs on the first seed, the best one (fewest steps to target, then lowest final
metric) runs on the remaining seeds. The grids:

* ``kron``: ``kron.torch.Kron`` at its defaults (lr 3e-3, P fitted on the gradient,
  kron_torch's update-probability schedule, Q0.5EQ1.5 geometry, bfloat16 factors, ...) with
  ``seed`` = the run's seed. No sweep: the issue's targets are about the defaults.
* ``kron_lr``: the same with lr ∈ {3e-4, 1e-3, 3e-3} (full tier; shows what tuning adds).
* ``kron_momentum``: ``Kron`` with P fitted on the momentum (``momentum_into_precond_update=True``,
  kron_torch's and heavyball's default; lr 1e-3 unless swept), lr ∈ {3e-4, 1e-3, 3e-3} (full
  tier; the other side of the measurement behind the fitting-target default,
  docs/benchmarks.md).
* ``kron_skew``: ``Kron`` with psgd_torch's skew rule (``max_skew=1.0``: the long side of a
  rectangular matrix gets a diagonal factor; lr 1e-3 unless swept), lr ∈ {3e-4, 1e-3, 3e-3}
  (full tier; the layout docs/torch.md suggests for transformers, against the dense default).
* ``kron_f32``: the defaults with float32 factors (``precond_dtype=torch.float32``, the default
  before bfloat16 was measured to match it; the default lr, 3e-3, when made with lr None; a
  plan that does not sweep takes the grid's middle, 1e-3),
  lr ∈ {3e-4, 1e-3, 3e-3} (full tier; the other side of the measurement behind the dtype).
* ``adamw``: ``torch.optim.AdamW`` (β = (0.9, 0.999), ε = 1e-8, no weight decay), lr over the
  task's ``adam_lrs`` (three values around the best lr measured in benchmarks.md).
* ``sgd``: ``torch.optim.SGD`` with momentum 0.9 (heavy ball), lr over the task's ``sgd_lrs``.
* ``kron_torch``: the peer ``kron_torch.Kron`` at its defaults but lr ∈ {3e-4, 1e-3, 3e-3}.
* ``heavyball``: the peer ``heavyball.PSGDKron`` at its defaults but lr ∈ {3e-4, 1e-3, 3e-3};
  its ``torch.compile`` is switched off (on this CPU compile time dominates short runs).

The JAX runner (``--framework jax``) has the same roles under the same names with ``_jax``
appended: ``kron_jax`` is ``kron.optax.kron`` at its defaults (psgdax's: lr 1e-3, the
preconditioner fitted on the gradient), ``kron_lr_jax`` the same with the
lr swept over the same grid as ``kron_lr``, ``adamw_jax`` ``optax.adamw`` with AdamW's grid,
and the peer ``psgdax`` is ``psgdax.kron`` at its defaults but lr ∈ {3e-4, 1e-3, 3e-3} (its
``key`` drawn from the run's seed, since its default key is one array shared by every instance).
The Keras runner (``--framework keras``, Keras on its JAX backend) likewise has ``kron_keras``
(``kron.keras.Kron`` at its defaults, seed 000's: lr 3e-4 and P fitted on the momentum),
``kron_lr_keras`` and ``adamw_keras`` (``keras.optimizers.AdamW``, no weight decay).

Peers appear only when importable.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .tasks import Task

Params = list[torch.Tensor]

# The packages each framework's runner imports (the Keras runner runs Keras on JAX).
RUNNER_PACKAGES = {"torch": ("torch",), "jax": ("jax", "optax"), "keras": ("keras", "jax")}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the comparison.

    Attributes:
        name: identifier on the command line and in file names.
        label: name in tables and plots.
        framework: ``"torch"``, ``"jax"`` or ``"keras"``.
        make: ``(params, lr or None, seed) ->`` a ``torch.optim.Optimizer`` (torch), an
            ``optax.GradientTransformation`` (jax; ``params`` is then the initial pytree) or a
            ``keras.optimizers.Optimizer`` (keras; ``params`` is the list of variables).
        grid: ``task -> learning rates swept``; ``(None,)`` runs the defaults only.
        package: import name whose presence (and version) the spec needs, or ``None``.
        float64: whether it can train float64 parameters; the plan leaves it out of the
            float64 tasks otherwise. heavyball 3.2.1 cannot (its float32 factors meet the
            float64 gradient in an einsum and torch raises), nor can psgdax 0.1.1 (with
            ``jax_enable_x64`` on, its ``lax.cond`` branches return float32 and float64
            Lipschitz estimates and tracing fails).
        factory: ``"module:function"`` that ``make`` calls with ``learning_rate`` and its
            other keywords left at their defaults (JAX specs only); its signature's defaults
            stand in for the hyperparameters an optax transformation does not expose.
    """

    name: str
    label: str
    framework: str
    make: Callable[[Any, float | None, int], Any]
    grid: Callable[[Task], tuple[float | None, ...]]
    package: str | None = None
    float64: bool = True
    factory: str | None = None

    def available(self) -> bool:
        """Whether the framework's runner and the spec's own package are installed."""
        needed = (*RUNNER_PACKAGES[self.framework], *filter(None, (self.package,)))
        return all(importlib.util.find_spec(name) is not None for name in needed)

    def settings(self, lr: float | None, seed: int) -> dict[str, Any]:
        """The hyperparameters a run at ``lr`` gets, defaults resolved (a torch optimizer's
        ``defaults``, a Keras optimizer's ``get_config()``, a JAX spec's ``factory`` signature;
        JSON scalars only), so that records made under other defaults are not resumed. Empty
        for a JAX spec without a ``factory`` (its ``make`` passes every hyperparameter)."""
        if self.framework == "torch":
            values = self.make([torch.zeros(1, requires_grad=True)], lr, seed).defaults
        elif self.framework == "keras":
            from .keras_session import keras_on_jax

            keras_on_jax()
            values = self.make(None, lr, seed).get_config()
            # Keras numbers an optimizer's default name by how many the process has built
            # ("adam_w", "adam_w_1", ...): not a setting, and it would never match on resume.
            values.pop("name", None)
        elif self.factory is not None:
            module, function = self.factory.split(":")
            signature = inspect.signature(getattr(importlib.import_module(module), function))
            values = {
                name: parameter.default
                for name, parameter in signature.parameters.items()
                if parameter.default is not inspect.Parameter.empty
            }
            if lr is not None:
                values["learning_rate"] = lr
        else:
            return {}
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in values.items()
            if _is_json_scalar(value)
            or (isinstance(value, tuple) and all(_is_json_scalar(v) for v in value))
        }


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


PSGD_GRID = (3e-4, 1e-3, 3e-3)


def _kron(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
    from kron.torch import Kron

    return Kron(params, seed=seed) if lr is None else Kron(params, lr=lr, seed=seed)


def _kron_variant(
    default_lr: float = 1e-3, **options: Any
) -> Callable[[Params, float | None, int], torch.optim.Optimizer]:
    """``make`` of a Kron variant: ``options`` on top of the defaults, lr ``default_lr`` (1e-3,
    the middle of ``PSGD_GRID``, which the planner runs when it does not sweep) unless given."""

    def make(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
        from kron.torch import Kron

        return Kron(params, lr=default_lr if lr is None else lr, seed=seed, **options)

    return make


def _adamw(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3 if lr is None else lr, weight_decay=0.0)


def _sgd(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-2 if lr is None else lr, momentum=0.9)


def _kron_torch(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
    import kron_torch

    return kron_torch.Kron(params) if lr is None else kron_torch.Kron(params, lr=lr)


def _heavyball(params: Params, lr: float | None, seed: int) -> torch.optim.Optimizer:
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball.PSGDKron(params) if lr is None else heavyball.PSGDKron(params, lr=lr)


def _kron_jax(params: Any, lr: float | None, seed: int):
    import kron.optax

    return kron.optax.kron(seed=seed) if lr is None else kron.optax.kron(lr, seed=seed)


def _adamw_jax(params: Any, lr: float | None, seed: int):
    import optax

    return optax.adamw(1e-3 if lr is None else lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def _psgdax(params: Any, lr: float | None, seed: int):
    import jax
    import psgdax

    key = jax.random.PRNGKey(seed)
    return psgdax.kron(key=key) if lr is None else psgdax.kron(lr, key=key)


def _kron_keras(params: Any, lr: float | None, seed: int):
    from kron.keras import Kron

    return Kron(seed=seed) if lr is None else Kron(learning_rate=lr, seed=seed)


def _adamw_keras(params: Any, lr: float | None, seed: int):
    import keras

    return keras.optimizers.AdamW(1e-3 if lr is None else lr, weight_decay=0.0, epsilon=1e-8)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("kron", "kron (defaults)", "torch", _kron, lambda t: (None,)),
        OptimizerSpec("kron_lr", "kron (lr swept)", "torch", _kron, lambda t: PSGD_GRID),
        OptimizerSpec(
            "kron_momentum",
            "kron (P fit on momentum)",
            "torch",
            _kron_variant(momentum_into_precond_update=True),
            lambda t: PSGD_GRID,
        ),
        OptimizerSpec(
            "kron_skew",
            "kron (max_skew=1)",
            "torch",
            _kron_variant(max_skew=1.0),
            lambda t: PSGD_GRID,
        ),
        OptimizerSpec(
            "kron_f32",
            "kron (float32 factors)",
            "torch",
            _kron_variant(default_lr=3e-3, precond_dtype=torch.float32),
            lambda t: PSGD_GRID,
        ),
        OptimizerSpec("adamw", "AdamW", "torch", _adamw, lambda t: t.adam_lrs),
        OptimizerSpec("sgd", "SGD momentum 0.9", "torch", _sgd, lambda t: t.sgd_lrs),
        OptimizerSpec(
            "kron_torch", "kron_torch.Kron", "torch", _kron_torch, lambda t: PSGD_GRID, "kron_torch"
        ),
        OptimizerSpec(
            "heavyball",
            "heavyball.PSGDKron",
            "torch",
            _heavyball,
            lambda t: PSGD_GRID,
            "heavyball",
            float64=False,
        ),
        OptimizerSpec(
            "kron_jax",
            "kron.optax (defaults)",
            "jax",
            _kron_jax,
            lambda t: (None,),
            factory="kron.optax:kron",
        ),
        OptimizerSpec(
            "kron_lr_jax",
            "kron.optax (lr swept)",
            "jax",
            _kron_jax,
            lambda t: PSGD_GRID,
            factory="kron.optax:kron",
        ),
        OptimizerSpec("adamw_jax", "optax.adamw", "jax", _adamw_jax, lambda t: t.adam_lrs),
        OptimizerSpec(
            "psgdax",
            "psgdax.kron",
            "jax",
            _psgdax,
            lambda t: PSGD_GRID,
            "psgdax",
            float64=False,
            factory="psgdax:kron",
        ),
        OptimizerSpec(
            "kron_keras", "kron.keras (defaults)", "keras", _kron_keras, lambda t: (None,)
        ),
        OptimizerSpec(
            "kron_lr_keras", "kron.keras (lr swept)", "keras", _kron_keras, lambda t: PSGD_GRID
        ),
        OptimizerSpec(
            "adamw_keras", "keras AdamW", "keras", _adamw_keras, lambda t: t.adam_lrs, "keras"
        ),
    )
}


def for_framework(name: str, framework: str) -> OptimizerSpec | None:
    """The spec playing role ``name`` (``kron``, ``adamw``, ...) on ``framework``, or ``None``
    when that framework has no such optimizer (SGD and the torch peers have no JAX twin)."""
    # Torch names carry no suffix (``kron_torch`` is a peer, not kron's torch twin).
    candidates = (name,) if framework == "torch" else (f"{name}_{framework}", name)
    for candidate in candidates:
        spec = OPTIMIZERS.get(candidate)
        if spec is not None and spec.framework == framework:
            return spec
    return None


def get_optimizer(name: str) -> OptimizerSpec:
    """The spec called ``name``; ``KeyError`` lists the known names."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None


def lr_label(lr: float | None) -> str:
    """``"default"`` or the learning rate in short form (``3e-04`` → ``"0.0003"``)."""
    return "default" if lr is None else f"{lr:g}"
