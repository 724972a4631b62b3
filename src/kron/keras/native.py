"""What ``keras.ops`` cannot express, written once per Keras backend: counter-based random draws, an
error raised from inside a compiled step, and a ``cond`` that stays cheap when run eagerly.

Draws are pure functions of ``(seed, step, index, stream)``: ``seed`` and ``step`` may be traced
integer tensors (read from optimizer variables), ``index`` (the variable's position) and ``stream``
(what the numbers are for) are Python ints. Nothing is stateful, so a checkpoint that holds the
seed and the step counter resumes with the very draws of the run that never stopped, and
``stateless_apply`` needs no RNG state. ``keras.random`` is not used because it accepts only a
Python int or a ``SeedGenerator`` (whose state is a separate, per-call variable) as the seed.

* TensorFlow: SplitMix64 in ``uint64`` tensor ops, keyed by a chain over ``(seed, step,
  index·16 + stream)`` and counted over the elements; normals by Box–Muller. Integer arithmetic
  gives the same bits eagerly, in ``tf.function`` and under XLA (``jit_compile``), where
  ``tf.random.stateless_*`` switch generators: a run compiled with XLA and its eager resume
  would draw different numbers.
* JAX: ``fold_in(fold_in(PRNGKey(seed), step), index·16 + stream)`` (threefry).
* PyTorch: a ``torch.Generator`` seeded on the host with a SplitMix64 hash of the four integers.

The streams are independent within a backend; the backends draw different numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import keras

# Random streams of one variable; ``PROBES + axis`` for the norm-bound probes of each axis.
NOISE, BALANCE, DECISION, PROBES = 0, 1, 2, 3
STREAMS = 16  # streams per variable
MAX_VARIABLES = 1 << 20  # index·16 + stream stays below 2²⁴, a word of every backend's key
MAX_SEED = (1 << 31) - 1


def _check(index: int, stream: int) -> int:
    if not (0 <= index < MAX_VARIABLES and 0 <= stream < STREAMS):
        raise ValueError(
            f"random stream out of range: index={index} (< {MAX_VARIABLES}), "
            f"stream={stream} (< {STREAMS})."
        )
    return index * STREAMS + stream


def normal(seed: Any, step: Any, index: int, stream: int, shape: tuple, dtype: str) -> Any:
    """Standard normal draws of ``shape`` in ``dtype`` for ``(seed, step, index, stream)``."""
    word = _check(index, stream)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.cast(_tf_normal(seed, step, word, shape), dtype)
    if backend == "jax":
        import jax

        return jax.random.normal(_jax_key(seed, step, word), shape, dtype)
    if backend == "torch":
        import torch

        generator = _torch_generator(seed, step, word)
        values = torch.randn(shape, generator=generator, dtype=_torch_dtype(dtype))
        return keras.ops.convert_to_tensor(values)  # onto Keras's device
    raise ValueError(f"Unsupported Keras backend {backend!r}; accepted: tensorflow, jax, torch.")


def uniform(seed: Any, step: Any, index: int, stream: int) -> Any:
    """One float32 draw in ``[0, 1)`` for ``(seed, step, index, stream)``."""
    word = _check(index, stream)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_unit(_tf_bits(seed, step, word, 1), 40)[0]
    if backend == "jax":
        import jax

        return jax.random.uniform(_jax_key(seed, step, word), (), "float32")
    if backend == "torch":
        import torch

        value = torch.rand((), generator=_torch_generator(seed, step, word))
        return keras.ops.convert_to_tensor(value)
    raise ValueError(f"Unsupported Keras backend {backend!r}; accepted: tensorflow, jax, torch.")


def _tf_mix(x: Any) -> Any:
    """SplitMix64's step on a ``uint64`` tensor: add the golden-ratio increment, then mix."""
    import tensorflow as tf

    bits = tf.bitwise

    def constant(value: int) -> Any:
        return tf.constant(value, tf.uint64)

    x = x + constant(0x9E3779B97F4A7C15)
    x = bits.bitwise_xor(x, bits.right_shift(x, constant(30))) * constant(0xBF58476D1CE4E5B9)
    x = bits.bitwise_xor(x, bits.right_shift(x, constant(27))) * constant(0x94D049BB133111EB)
    return bits.bitwise_xor(x, bits.right_shift(x, constant(31)))


def _tf_bits(seed: Any, step: Any, word: int, count: int) -> Any:
    """``count`` words of 64 random bits: SplitMix64's sequence from a key that chains ``seed``,
    ``step`` and ``word``, as ``_torch_generator`` chains them."""
    import tensorflow as tf

    key = tf.zeros((), tf.uint64)
    for part in (seed, step, word):
        part = tf.cast(tf.cast(part, tf.int64), tf.uint64)
        key = _tf_mix(tf.bitwise.bitwise_xor(key, part))
    counter = tf.cast(tf.range(count, dtype=tf.int64), tf.uint64)
    return _tf_mix(key + counter * tf.constant(0x9E3779B97F4A7C15, tf.uint64))


def _tf_unit(bits: Any, shift: int) -> Any:
    """The 24 bits of ``bits`` from ``shift`` up as a float32 in ``[0, 1)`` (exact)."""
    import tensorflow as tf

    field = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(bits, tf.constant(shift, tf.uint64)),
        tf.constant(0xFFFFFF, tf.uint64),
    )
    return tf.cast(field, tf.float32) * (1.0 / (1 << 24))


def _tf_normal(seed: Any, step: Any, word: int, shape: tuple) -> Any:
    """Standard normals by Box–Muller, both of each pair (``r·cos θ`` and ``r·sin θ``) from one
    word's two 24-bit uniforms, so the uint64 temporaries of an eager step are half the output's
    count (``1 - u`` keeps the logarithm finite). Only the last ulps can differ between XLA and
    the eager kernels, whose ``log``, ``cos`` and ``sin`` are not bit-identical."""
    import tensorflow as tf

    count = math.prod(int(n) for n in shape)
    bits = _tf_bits(seed, step, word, (count + 1) // 2)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - _tf_unit(bits, 40)))
    angle = (2.0 * math.pi) * _tf_unit(bits, 16)
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(pairs[:count], shape)


def _jax_key(seed: Any, step: Any, word: int) -> Any:
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(jnp.asarray(seed, jnp.uint32))
    return jax.random.fold_in(jax.random.fold_in(key, jnp.asarray(step, jnp.uint32)), word)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _torch_generator(seed: Any, step: Any, word: int) -> Any:
    import torch

    mixed = 0
    for part in (int(seed), int(step), word):  # int() reads the counters on the host
        mixed = _splitmix64(mixed ^ part)
    generator = torch.Generator()
    generator.manual_seed(mixed & 0x7FFFFFFFFFFFFFFF)
    return generator


def _torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, keras.backend.standardize_dtype(dtype))


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``keras.ops.cond``, except that a concrete JAX predicate picks its branch in Python: eager
    JAX would otherwise trace and compile both branches again on every call (the branches are
    fresh closures), while under ``jit`` the predicate is a tracer and ``lax.cond`` is used."""
    if keras.backend.backend() == "jax":
        import jax

        if not isinstance(pred, jax.core.Tracer):
            return true_fn() if bool(pred) else false_fn()
    return keras.ops.cond(pred, true_fn, false_fn)


def raise_if(bad: Any, message: str) -> Any:
    """Raise ``FloatingPointError(message)`` when the boolean scalar ``bad`` holds, from wherever
    the step runs: eagerly (PyTorch, TensorFlow eager) at once; inside ``tf.function`` through
    ``tf.debugging.Assert`` (``InvalidArgumentError``), whose op is returned for :func:`after`;
    inside ``jax.jit`` through a host callback (``JaxRuntimeError`` wrapping the
    ``FloatingPointError``; the failed step's results are discarded). XLA-compiled TensorFlow
    drops assertions, so there it raises ``ValueError`` while tracing rather than never.
    Returns None but in a ``tf.function``."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            if bool(bad):
                raise FloatingPointError(message)
            return None
        if _in_xla_context():
            raise ValueError(
                "nonfinite='raise' cannot raise inside an XLA-compiled TensorFlow step (XLA drops "
                "assertions); use nonfinite='skip' or compile the model with jit_compile=False."
            )
        return tf.debugging.Assert(tf.logical_not(bad), [message])
    if backend == "jax":
        import jax

        def check(flag: Any) -> None:
            if bool(flag):
                raise FloatingPointError(message)

        jax.debug.callback(check, bad)
    elif bool(bad):
        raise FloatingPointError(message)
    return None


def after(ops: list) -> Any:
    """A context in which the ops created run after ``ops`` (TensorFlow graph ops from
    :func:`raise_if`); nothing to wait for when ``ops`` is empty."""
    if not ops:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.control_dependencies(ops)


def _in_xla_context() -> bool:
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - layout of TF internals changed
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
