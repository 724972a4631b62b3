"""The ``kron bench`` suite: tasks × optimizers × seeds, with records, a summary table and plots.

Modules: ``tasks`` (problem definitions and success criteria), ``optimizers`` (what is compared
and how each is swept), ``tiers`` (quick / standard / full plans), ``runner`` (one run → one
record), ``suite`` (a plan's sweeps, in order), ``workers`` (the same on worker processes),
``records`` (JSON files on disk, resume), ``summary`` (Markdown table and target
verdicts), ``plots`` (PNG figures) and ``cli`` (the ``kron`` command).
"""
