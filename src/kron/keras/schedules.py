"""The default preconditioner update schedule as a serialisable Keras schedule."""

from __future__ import annotations

import math
from typing import Any

import keras

from kron.core import exponential_schedule, get_ops
from kron.core.option_types import as_python_number, is_real_number


@keras.saving.register_keras_serializable(package="kron")
class UpdateProbability(keras.optimizers.schedules.LearningRateSchedule):
    """kron_torch's preconditioner update probability,
    ``clip(max_prob·exp(-decay·(step - flat_start)), min_prob, max_prob)``: 1.0 for the first 500
    steps, then decaying to 0.03 (reached at step 4007). ``step`` counts the optimizer updates
    taken before this one (``Kron.iterations``).

    Any ``LearningRateSchedule`` (or callable of the step) can stand in for it as
    ``Kron(preconditioner_update_probability=...)``; this one is the default.
    """

    def __init__(
        self,
        max_prob: float = 1.0,
        min_prob: float = 0.03,
        decay: float = 0.001,
        flat_start: int = 500,
    ) -> None:
        given = dict(max_prob=max_prob, min_prob=min_prob, decay=decay, flat_start=flat_start)
        for name, value in given.items():
            if not is_real_number(value) or not math.isfinite(value):
                raise ValueError(
                    f"UpdateProbability's {name} must be a finite number; got {value!r}."
                )
        max_prob, min_prob, decay, flat_start = map(as_python_number, given.values())
        if not 0 < min_prob <= max_prob <= 1:
            raise ValueError(
                "UpdateProbability needs 0 < min_prob <= max_prob <= 1; got "
                f"min_prob={min_prob!r}, max_prob={max_prob!r}."
            )
        if not decay >= 0:
            raise ValueError(f"UpdateProbability needs decay >= 0; got {decay!r}.")
        self.max_prob = max_prob
        self.min_prob = min_prob
        self.decay = decay
        self.flat_start = flat_start
        self._probability = exponential_schedule(
            max_prob, min_prob, decay, flat_start, ops=get_ops("keras")
        )

    def __call__(self, step: Any) -> Any:
        return self._probability(keras.ops.cast(step, "float32"))

    def get_config(self) -> dict[str, Any]:
        return {
            "max_prob": self.max_prob,
            "min_prob": self.min_prob,
            "decay": self.decay,
            "flat_start": self.flat_start,
        }
