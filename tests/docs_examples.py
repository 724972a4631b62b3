"""Running the ```python examples of README.md and docs/*.md, so that the docs cannot rot.

An example is run as it is printed, with what it assumes but does not show (a model, data, a
loss) defined before it by the test, and with a few named substitutions where this machine
differs from the page's (a CPU for a GPU, one process for a cluster). Each page's test file
gives every block of its page an :class:`Example`; a page that gains a block fails its test
until the block has one.
"""

from __future__ import annotations

import linecache
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


class Example(NamedTuple):
    """How one block is run.

    ``prelude`` runs before the block and defines the names it assumes; ``replace`` maps text of
    the block to what runs here instead (each key must occur in the block, so a changed page
    fails rather than silently running something else); ``epilogue`` runs after it, in the same
    namespace, and asserts that the block did what its page says."""

    prelude: str = ""
    replace: Mapping[str, str] = MappingProxyType({})
    epilogue: str = ""


def python_examples(page: str) -> list[str]:
    """The ```python blocks of ``page`` (``"README.md"`` or a file under docs/), in order."""
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    return _BLOCK.findall(path.read_text())


def example_source(page: str, index: int, example: Example) -> str:
    """The program that runs block ``index`` of ``page``: prelude, adapted block, epilogue."""
    block = python_examples(page)[index]
    for old, new in example.replace.items():
        assert old in block, f"{page} block {index} no longer contains {old!r}"
        block = block.replace(old, new)
    return "\n".join(textwrap.dedent(part) for part in (example.prelude, block, example.epilogue))


def run_example(page: str, index: int, example: Example) -> dict:
    """Run block ``index`` of ``page`` in this process; its namespace afterwards."""
    namespace: dict = {"__name__": f"docs_example_{index}"}
    source, name = example_source(page, index, example), f"{page}[{index}]"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # for tracebacks
    code = compile(source, name, "exec")
    exec(code, namespace)
    return namespace


def run_example_in_process(
    page: str, index: int, example: Example, env: dict[str, str], cwd: Path
) -> str:
    """Run block ``index`` of ``page`` in a fresh Python with ``env`` (for settings that must
    precede an import, such as XLA's host device count); its standard output."""
    script = cwd / f"example_{index}.py"
    script.write_text(example_source(page, index, example))
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
