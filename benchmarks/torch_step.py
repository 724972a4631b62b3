"""Optimizer step time and state size: kron.torch.Kron against kron_torch, heavyball and AdamW.

Every optimizer runs in this one process on the same model and the same batches. For each
(model, update probability, optimizer) cell the script times ``optimizer.step()`` alone (forward
and backward are identical across optimizers and are excluded) over ``--steps`` steps after
``--warmup`` steps (which absorb the peers' torch.compile), and reports the median over
``--repeats`` such windows, taken in turn across the cell's optimizers, plus the bytes of
optimizer state. On CUDA each timed step is bracketed by synchronisations, and the step's peak
memory above what was allocated before it is reported too. Results go to stdout as a Markdown
table and to ``--json``.

    python benchmarks/torch_step.py --json benchmarks/results/torch_step_cpu.json
    python benchmarks/torch_step.py --device cuda --warmup 40 \\
        --json benchmarks/results/torch_step_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from kron.torch import KRON_TORCH_OPTIONS, Kron
from kron.torch.functional import state_bytes


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


class TinyLM(nn.Module):
    """A 4-layer, d=128 transformer encoder over a 128-symbol vocabulary."""

    def __init__(self, vocab: int = 128, d: int = 128, layers: int = 4, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=4 * d, batch_first=True, dropout=0.0
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=h.device)
        return self.head(self.body(h, mask=mask, is_causal=True))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def mlp_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(128, 256, generator=gen).to(device_of(model))
    y = torch.randint(0, 10, (128,), generator=gen).to(device_of(model))
    return nn.functional.cross_entropy(model(x), y)


def tiny() -> nn.Module:
    """An 8-16-16-4 MLP: its step is nearly all per-bucket overhead, not arithmetic."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def tiny_loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step)).to(device_of(model))
    return model(x).square().mean()


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 128, (16, 65), generator=torch.Generator().manual_seed(step))
    tokens = tokens.to(device_of(model))
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))


MODELS = {"mlp": (mlp, mlp_loss), "lm": (TinyLM, lm_loss), "tiny": (tiny, tiny_loss)}


def optimizers(probability: float) -> dict[str, Callable]:
    """Each optimizer with matching settings: kron_torch's and heavyball's own defaults, ours set
    to the same geometry and rules as each peer, then ours as shipped."""
    import heavyball
    import kron_torch

    p = probability
    as_heavyball = dict(
        preconditioner_update_probability=p,
        preconditioner_mode="EQ",
        max_size_triangular=2048,
        update_clipping="soft",
        update_clip_value=1.5,
        decision_rule="accumulator",
        cached=p < 0.5,
        precond_dtype=torch.float32,
    )
    return {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "kron_torch Kron": lambda ps: kron_torch.Kron(ps, preconditioner_update_probability=p),
        "ours as kron_torch": lambda ps: Kron(
            ps, **KRON_TORCH_OPTIONS, preconditioner_update_probability=p
        ),
        "heavyball PSGDKron": lambda ps: heavyball.PSGDKron(
            ps, preconditioner_update_probability=p
        ),
        "ours as heavyball": lambda ps: Kron(ps, **as_heavyball),
        "ours as heavyball (store_triu_as_line)": lambda ps: Kron(
            ps, **as_heavyball, store_triu_as_line=True
        ),
        "ours (default)": lambda ps: Kron(ps, preconditioner_update_probability=p),
        "ours (max_skew=1)": lambda ps: Kron(ps, preconditioner_update_probability=p, max_skew=1.0),
        "ours (cached=False)": lambda ps: Kron(
            ps, preconditioner_update_probability=p, cached=False
        ),
        "ours (precond_dtype=float32)": lambda ps: Kron(
            ps, preconditioner_update_probability=p, precond_dtype=torch.float32
        ),
        "ours (compile=True)": lambda ps: Kron(
            ps, preconditioner_update_probability=p, compile=True
        ),
    }


PEERS = ("kron_torch Kron", "heavyball PSGDKron")


class _Run:
    """One optimizer on its own copy of the model, stepping through the shared batches."""

    def __init__(self, model_name: str, make_opt: Callable, device: torch.device) -> None:
        build, self.loss_fn = MODELS[model_name]
        torch.manual_seed(0)
        self.model = build().to(device)
        self.opt = make_opt(list(self.model.parameters()))
        self.cuda = device.type == "cuda"
        self.step = 0
        self.step_peak_bytes = 0

    def steps(self, count: int) -> float:
        """Take ``count`` steps; the milliseconds per ``optimizer.step()``. On CUDA also the
        most memory any of them allocated above what was live before it."""
        elapsed = 0.0
        for _ in range(count):
            self.opt.zero_grad()
            self.loss_fn(self.model, self.step).backward()
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            self.opt.step()
            if self.cuda:
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - started
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() - before
                self.step_peak_bytes = max(self.step_peak_bytes, peak)
            self.step += 1
        return 1000 * elapsed / count


def time_cell(
    model_name: str,
    makers: dict[str, Callable],
    warmup: int,
    steps: int,
    repeats: int,
    device: torch.device,
) -> dict[str, tuple[float, int, int, float]]:
    """``{name: (median ms per step, state bytes, step peak bytes, warm-up seconds)}`` for one
    (model, probability) cell (the peak is 0 off CUDA; the warm-up is the total time of the
    warm-up steps' ``optimizer.step()``, which holds any ``torch.compile``). Windows are taken
    in turn across the optimizers, so a change in the machine's load between windows reaches
    every optimizer alike instead of skewing the ratios."""
    runs = {name: _Run(model_name, make, device) for name, make in makers.items()}
    warmup_seconds = {name: run.steps(warmup) * warmup / 1000 for name, run in runs.items()}
    windows: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            windows[name].append(run.steps(steps))
    return {
        name: (
            statistics.median(windows[name]),
            state_bytes(run.opt),
            run.step_peak_bytes,
            warmup_seconds[name],
        )
        for name, run in runs.items()
    }


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table, with each optimizer's time relative to the faster peer
    (kron_torch or heavyball) and to AdamW in the same (model, probability) cell."""
    with_peak = any(row.get("step_peak_bytes") for row in rows)
    with_warmup = any("warmup_s" in row for row in rows)  # files before it was recorded lack it
    lines = [
        "| model | p | optimizer | ms/step | × faster peer | × AdamW | state MiB |"
        + (" step peak MiB |" if with_peak else "")
        + (" warm-up s |" if with_warmup else ""),
        "|---|---|---|---|---|---|---|"
        + ("---|" if with_peak else "")
        + ("---|" if with_warmup else ""),
    ]
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["probability"]), {})[row["optimizer"]] = row
    for (model, probability), by_name in cells.items():
        peers = [by_name[n]["ms_per_step"] for n in PEERS if n in by_name]
        peer = min(peers) if peers else math.nan
        adamw = by_name["AdamW"]["ms_per_step"] if "AdamW" in by_name else math.nan
        for name, row in by_name.items():
            ms = row["ms_per_step"]
            versus_peer = "–" if math.isnan(peer) else f"{ms / peer:.2f}"
            versus_adamw = "–" if math.isnan(adamw) else f"{ms / adamw:.1f}"
            line = (
                f"| {model} | {probability:g} | {name} | {ms:.2f} | {versus_peer} | "
                f"{versus_adamw} | {row['state_bytes'] / 2**20:.2f} |"
            )
            if with_peak:
                line += f" {row['step_peak_bytes'] / 2**20:.2f} |"
            if with_warmup:
                line += f" {row['warmup_s']:.1f} |"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lm"], choices=list(MODELS))
    parser.add_argument("--probabilities", nargs="+", type=float, default=[1.0, 0.03])
    parser.add_argument("--only", nargs="*", default=None, help="optimizer names to run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=34)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the models live: cpu or cuda")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--markdown-from", default=None, help="print the table of an earlier --json file and exit"
    )
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown(json.load(f)["rows"]))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        import heavyball.utils

        # heavyball's own mode, max-autotune-no-cudagraphs, benchmarks some twenty matmul
        # kernels per shape (about 45 s each on an H100): more than a device lease allows. The
        # compiled graphs are the same; only the matmul kernel choice can differ.
        heavyball.utils.compile_mode = "default"
    meta = dict(
        machine=platform.processor() or platform.machine(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        args=vars(args),
        heavyball_compile_mode=getattr(sys.modules.get("heavyball.utils"), "compile_mode", None),
    )
    rows = []
    for model_name in args.models:
        for probability in args.probabilities:
            makers = {
                name: make
                for name, make in optimizers(probability).items()
                if not args.only or name in args.only
            }
            cell = time_cell(model_name, makers, args.warmup, args.steps, args.repeats, device)
            for name, (ms, nbytes, peak, warmup_s) in cell.items():
                rows.append(
                    dict(
                        model=model_name,
                        probability=probability,
                        optimizer=name,
                        ms_per_step=ms,
                        state_bytes=nbytes,
                        step_peak_bytes=peak,
                        warmup_s=warmup_s,
                    )
                )
                print(
                    f"| {model_name} | {probability:g} | {name} | {ms:.2f} | "
                    f"{nbytes / 2**20:.2f} |",
                    flush=True,
                )
            if args.json:  # after every cell, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
