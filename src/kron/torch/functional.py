"""The PyTorch glue between ``torch.Tensor`` parameters and :mod:`kron.core`: random streams
(and the stream identifiers the optimizer draws with), clipping, stacking of same-shape
parameters, bf16 storage, leaving autocast, and Hessian-vector products. No math lives here
that other front ends would also need."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kron.core import (
    cautious,
    clip_elementwise,
    clip_l2,
    clip_rms,
    get_ops,
    norm_per_parameter,
    rms_per_parameter,
    shrink_factor,
    soft_clip,
)

OPS = get_ops("torch")
# heavyball.utils's clipping functions by name (heavyball resolves a string to the function with
# its default threshold): each is one of ours at that threshold, whatever ``*_clip_value`` says.
HEAVYBALL_CLIPPING = {
    "l2_clip_": ("l2_norm", 1.0),  # x / max(‖x‖, 1): our l2_norm at 1
    "rmsnorm_clip_": ("rms", 1.0),  # x / max(RMS(x), 1): our rms at 1
    "trust_region_clip_": ("soft", 1.5),  # scale=1.5, lerp=0.9, clamp at ±2: our soft at 1.5
}
CLIPPING_NAMES = ("rms", "l2_norm", "value", "soft", *HEAVYBALL_CLIPPING)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_for(*words: int) -> int:
    """A 63-bit seed from integers (seed, step, group, parameter, stream): a SplitMix64 chain,
    identical in every process and run, and cheap enough to call per parameter per step."""
    state = 0
    for word in words:
        state = _splitmix64(state ^ (word & _MASK64))
    return state >> 1


def uniform_for(*words: int) -> float:
    """A uniform draw in ``[0, 1)`` from the same words (for host-side random decisions)."""
    return seed_for(*words) / float(1 << 63)


# Stream identifiers mixed into the counter-based seeds, the last of the words above.
NOISE, PROBE, SUBSPACE, ROUNDING, BALANCE, DECISION = range(6)


class Streams:
    """Counter-based normal draws: the same words give the same numbers in every process on the
    same device type, so replicas agree and resumed runs repeat (CPU and CUDA generators are
    different algorithms, so a run moved between them draws different noise)."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def normal(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, words: Sequence[int]
    ) -> torch.Tensor:
        """Standard normal draws in ``dtype``. Half-precision ones are float32 draws rounded, so
        a run's noise is the same numbers whatever its factors' dtype. On the CPU they are the
        numbers PyTorch's bfloat16 draws give too, in 0.67 instead of 1.07 ms for 512² values
        (development machine)."""
        generator = self._seeded(device, words)
        drawn = torch.promote_types(dtype, torch.float32)
        values = torch.randn(tuple(shape), generator=generator, dtype=drawn, device=device)
        return values.to(dtype)

    def low_bits(
        self, shape: Sequence[int], device: torch.device, words: Sequence[int]
    ) -> torch.Tensor:
        """Uniform integers in ``[0, 2**16)`` as int32."""
        generator = self._seeded(device, words)
        return torch.randint(
            0, 1 << 16, tuple(shape), generator=generator, dtype=torch.int32, device=device
        )

    def _seeded(self, device: torch.device, words: Sequence[int]) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(seed_for(*words))
        return generator


def clipper(
    spec: str | Callable[[torch.Tensor], torch.Tensor] | None,
    threshold: float,
    in_place: bool = False,
    read_norms: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A per-parameter clip for ``(S, ...)`` tensors from a name in :data:`CLIPPING_NAMES`, a
    callable of one parameter's tensor, or None. The callable may also return a one-element list,
    as heavyball's ``l2_clip_``, ``rmsnorm_clip_`` and ``trust_region_clip_`` do; their names
    are the named clips of :data:`HEAVYBALL_CLIPPING`, at heavyball's thresholds (``threshold``
    is ignored for them). With ``in_place`` the named clips except ``"soft"`` overwrite their
    input (for a temporary the caller owns; on the CPU each fresh large temporary costs page
    faults). ``read_norms`` (in place only, and
    only where reading a tensor is free: the CPU) lets ``"rms"`` and ``"l2_norm"`` read the
    norms on the host and leave the input alone when no row exceeds the threshold."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec in HEAVYBALL_CLIPPING:
        spec, threshold = HEAVYBALL_CLIPPING[spec]
    if not callable(spec) and not threshold > 0:
        raise ValueError(f"A clipping threshold must be > 0; got {threshold!r} for {spec!r}.")
    if callable(spec):
        return lambda x: _per_tensor(spec, x, copy=not in_place)
    if spec == "rms":
        if in_place:
            return lambda x: _shrink_rows_in_place(x, threshold, rms_per_parameter, read_norms)
        return lambda x: clip_rms(x, threshold, OPS)
    if spec == "l2_norm":
        if in_place:
            return lambda x: _shrink_rows_in_place(x, threshold, norm_per_parameter, read_norms)
        return lambda x: clip_l2(x, threshold, OPS)
    if spec == "value":
        if in_place:
            return lambda x: x.clamp_(-threshold, threshold)
        return lambda x: clip_elementwise(x, threshold, OPS)
    if spec == "soft":
        return lambda x: soft_clip(x, OPS, scale=threshold)
    raise ValueError(
        f"Unknown clipping {spec!r}; accepted: a callable, None, or one of "
        f"{', '.join(CLIPPING_NAMES)}."
    )


def _shrink_rows_in_place(
    x: torch.Tensor, limit: float, size_of: Callable, read_norms: bool
) -> torch.Tensor:
    """``x[s] · shrink_factor(size_of(x[s]), limit)`` in place (``size_of`` is core's
    ``rms_per_parameter`` or ``norm_per_parameter``). With ``read_norms`` the sizes are read on
    the host and ``x`` is left alone when every factor would be 1 (the usual case for a whitened
    update): a full pass over ``x`` fewer. Otherwise nothing is read (no synchronisation)."""
    sizes = size_of(x, OPS)
    # A size that passes this test has a factor of exactly 1; a NaN size fails it.
    if read_norms and all(limit >= size + 1e-12 for size in sizes.flatten().tolist()):
        return x
    return x.mul_(shrink_factor(sizes, limit, OPS))


def _per_tensor(spec: Callable, x: torch.Tensor, copy: bool) -> torch.Tensor:
    """``spec`` applied to each parameter's tensor ``x[s]``, restacked. With ``copy`` each gets a
    copy: ``x`` may be a view of ``p.grad`` (a lone parameter's stack is), which a callable that
    clips in place (heavyball's do) would otherwise overwrite. Compiled callables run eagerly:
    heavyball's are compiled with ``fullgraph=True`` and would recompile for every shape and
    dtype, failing once dynamo's recompile limit is reached."""
    with _force_eager():
        return torch.stack(
            [_one_tensor(spec(item.clone() if copy else item), spec) for item in x.unbind(0)]
        )


def _force_eager() -> Any:
    """``torch.compiler.set_stance("force_eager")`` where PyTorch has it (2.6 and later)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _one_tensor(result: Any, spec: Callable) -> torch.Tensor:
    if isinstance(result, (list, tuple)) and len(result) == 1:
        result = result[0]
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"A clipping callable must return a tensor (or a list of one); {spec!r} returned "
            f"{type(result).__name__}."
        )
    return result


def apply_caution(y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return cautious(y, grad, OPS)


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, generator_words: Sequence[int], streams: Streams
) -> torch.Tensor:
    """Round float32 or float64 ``x`` to bfloat16 with probability proportional to the distance
    to each neighbour (unbiased); other target dtypes are a plain cast, float16 clamped to its
    finite range first (a finite momentum past 65504 would be stored as inf and turn the
    parameter to NaN on the next step)."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        largest = torch.finfo(torch.float16).max
        return x.clamp(-largest, largest).to(dtype)
    if dtype != torch.bfloat16 or x.dtype not in (torch.float32, torch.float64):
        return x.to(dtype)
    # A float64 source goes through float32, whose rounding is at most 2⁻¹⁷ of bfloat16's spacing.
    x = x.to(torch.float32)
    # bf16 keeps the high 16 bits of fp32: adding uniform low bits before truncating rounds the
    # magnitude up with probability equal to the discarded fraction.
    low_bits = streams.low_bits(x.shape, x.device, generator_words)
    rounded = (x.contiguous().view(torch.int32) + low_bits) & -65536
    return rounded.view(torch.float32).to(torch.bfloat16)


def autocast_disabled() -> contextlib.ExitStack:
    """A context without the autocast that is on (CPU or CUDA), if any: under it the factor
    products would run in bfloat16 or float16 whatever ``precond_dtype`` says."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack along a new axis 0 (the single-tensor case is a view, not a copy)."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    return torch.stack(list(tensors))


_TRIU_INDICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _triu_indices(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _TRIU_INDICES:
        _TRIU_INDICES[key] = torch.triu_indices(n, n, device=device)
    return _TRIU_INDICES[key]


def triu_to_line(square: torch.Tensor) -> torch.Tensor:
    """The upper triangles of ``(..., n, n)`` matrices, row by row: ``(..., n(n+1)/2)``."""
    rows, cols = _triu_indices(square.shape[-1], square.device)
    return square[..., rows, cols]


def line_to_triu(line: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`triu_to_line`: ``(..., n(n+1)/2)`` -> upper-triangular ``(..., n, n)``."""
    rows, cols = _triu_indices(n, line.device)
    square = line.new_zeros(*line.shape[:-1], n, n)
    square[..., rows, cols] = line
    return square


def concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along axis 0 (the single-tensor case is the tensor itself)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def hessian_vector_products(
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    newton_params: Sequence[torch.Tensor],
    probes: Sequence[torch.Tensor],
    method: str,
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor]]:
    """Evaluate ``closure`` (which returns the loss and must not call ``backward``) and return
    ``(loss, grads of params, H·v for newton_params)``. A parameter the loss does not use gets a
    ``None`` gradient and a zero product.

    ``"double_backward"`` differentiates the gradient; where the model does not support double
    backward it warns and falls back to ``"finite_difference"``: ``(g(θ + εv) - g(θ)) / ε`` with
    ``ε = √eps(dtype)``, both gradients evaluated under the same RNG state (so dropout masks
    match) and the parameters restored exactly afterwards.
    """
    rng_devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    rng_before = _rng_state(rng_devices)
    with torch.enable_grad():
        loss = closure()
        if method == "double_backward":
            try:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                chosen = _select(grads, params, newton_params)
                # A gradient that does not depend on the parameters (the loss does not use
                # them, or is linear in them) has a zero product, and autograd refuses it.
                used = [
                    (g, p, v)
                    for g, p, v in zip(chosen, newton_params, probes)
                    if g is not None and g.requires_grad
                ]
                products = ()
                if used:
                    products = torch.autograd.grad(
                        [g for g, _, _ in used],
                        [p for _, p, _ in used],
                        grad_outputs=[v for _, _, v in used],
                        allow_unused=True,
                    )
                by_id = {id(p): h for (_, p, _), h in zip(used, products)}
                hvps = [_zero_if_none(by_id.get(id(p)), p) for p in newton_params]
                return loss.detach(), _detached(grads), hvps
            except RuntimeError as error:
                if "double backward" not in str(error) and "derivative" not in str(error):
                    raise
                warnings.warn(
                    f"Double backward failed ({error}); using finite differences.", stacklevel=3
                )
                _set_rng_state(rng_devices, rng_before)
                loss = closure()  # the graph was consumed by the failed attempt
        grads = _detached(torch.autograd.grad(loss, params, allow_unused=True))
    saved = [p.detach().clone() for p in newton_params]
    steps = [float(torch.finfo(p.dtype).eps) ** 0.5 for p in newton_params]
    # The shifted evaluation replays the first one's random draws (dropout masks) and then the
    # generators continue as if it had not happened.
    with torch.random.fork_rng(devices=rng_devices):
        _set_rng_state(rng_devices, rng_before)
        with torch.no_grad():
            for p, v, eps in zip(newton_params, probes, steps):
                p.add_(v.to(p.dtype), alpha=eps)
        with torch.enable_grad():
            shifted = torch.autograd.grad(closure(), newton_params, allow_unused=True)
    with torch.no_grad():
        for p, original in zip(newton_params, saved):
            p.copy_(original)
    base = _select(grads, params, newton_params)
    hvps = [
        _zero_if_none(None if s is None or g is None else (s - g) / eps, p)
        for s, g, p, eps in zip(shifted, base, newton_params, steps)
    ]
    return loss.detach(), grads, hvps


def newton_gradients(
    param_groups: list[dict[str, Any]],
    seed: int,
    streams: Streams,
    closure: Callable[[], torch.Tensor],
    newton: list[tuple[int, dict[str, Any]]],
    decisions: Sequence[Any],
    probes: dict[int, torch.Tensor],
    hvps: dict[int, torch.Tensor],
) -> Any:
    """Evaluate ``closure`` (the loss, without ``backward``) for a step with the Newton-type
    groups ``newton`` (``(gi, group)`` pairs of ``param_groups``) and set every trainable
    parameter's ``grad``; return the loss. Where ``decisions[gi].fit``, each trainable parameter
    of group ``gi`` gets a normal probe, drawn from ``streams`` with the words
    ``(seed, step, gi, index, PROBE)``, in ``probes``, and its Hessian-vector product in
    ``hvps`` (both by ``id(p)``), with the first Newton group's ``hvp_method``."""
    everything = [p for group in param_groups for p in group["params"]]
    for p in everything:
        if not p.requires_grad:
            p.grad = None  # frozen parameters must not step on a stale gradient
    params = [p for p in everything if p.requires_grad]
    if not params:  # all frozen: nothing to differentiate or step, as in torch.optim
        with torch.enable_grad():
            loss = closure()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss
    newton_params = []
    for gi, group in newton:
        for index, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"Newton-type preconditioning does not support complex parameters "
                    f"(parameter {index} of group {gi}, {p.dtype}); accepted: real "
                    f"floating-point parameters, or preconditioner_type='whitening'."
                )
        if not decisions[gi].fit:
            continue
        for index, p in enumerate(group["params"]):
            if p.requires_grad:
                words = (seed, group["step"], gi, index, PROBE)
                probes[id(p)] = streams.normal(p.shape, p.dtype, p.device, words)
                newton_params.append(p)
    if not newton_params:
        with torch.enable_grad():
            loss = closure()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        loss = loss.detach()
    else:
        loss, grads, products = hessian_vector_products(
            closure,
            params,
            newton_params,
            [probes[id(p)] for p in newton_params],
            newton[0][1]["hvp_method"],
        )
        hvps.update({id(p): h for p, h in zip(newton_params, products)})
    for p, g in zip(params, grads):
        p.grad = None if g is None else g
    return loss


def _rng_state(cuda_devices):
    return torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng_state(cuda_devices, state):
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    for device, device_state in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


def _select(grads, params, chosen):
    index = {id(p): i for i, p in enumerate(params)}
    return [grads[index[id(p)]] for p in chosen]


def _detached(grads):
    return [None if g is None else g.detach() for g in grads]


def _zero_if_none(value, like):
    return torch.zeros_like(like) if value is None else value.detach()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from ``optimizer.state`` (dicts, lists and tuples are
    walked, so peers' nested states count too); what a rank holds, for the benchmarks and the
    distributed tests."""

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(state) for state in optimizer.state.values())
