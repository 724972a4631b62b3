"""The ``kron bench`` suite: tasks × optimizers × seeds, with records, a summary table and plots.

Modules: ``tasks`` (problem definitions and success criteria), ``optimizers`` (what is compared
and how each is swept), ``tiers`` (quick / standard / full plans), ``runner`` (one run → one
record), ``suite`` (a plan's sweeps, in order), ``workers`` (the same on worker processes),
``records`` (JSON files on disk, resume), ``summary`` (Markdown table and target
verdicts), ``plots`` (PNG figures) and ``cli`` (the ``kron`` command).
"""

import importlib.util
import sys

# What every ``kron bench`` run imports: the tasks are PyTorch modules (the JAX and Keras
# runners port them), and the summary is drawn with matplotlib and printed with rich.
_NEEDED = {"torch": "torch", "matplotlib": "matplotlib", "rich": "rich", "sklearn": "scikit-learn"}


def main(argv: list[str] | None = None) -> int:
    """The ``kron`` command. Says which packages are missing (kron installed without its
    ``bench`` extra) instead of failing on the first import."""
    missing = [pip for module, pip in _NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"kron bench needs {', '.join(missing)}, which is not installed; install the bench "
            "extra: pip install -c constraints.txt 'kron[bench]' (or bash scripts/bench.sh)",
            file=sys.stderr,
        )
        return 2
    from .cli import main as run_command

    return run_command(argv)
