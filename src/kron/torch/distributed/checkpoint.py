"""Loading optimizer state through ``torch.distributed.checkpoint`` (DCP) at any world size.

``dcp.load`` fills a state dict that each rank allocates beforehand. With owner-only state a rank
cannot know the shapes of what it now owns (the checkpoint may come from another world size), so
:func:`load_template` reads them from the checkpoint's metadata: it returns, for this rank, the
optimizer's param groups and the state entries of the parameters it owns, allocated with the
saved shapes and dtypes on the parameters' devices. State keys are parameter positions over all
groups (``state_dict`` order), which do not depend on the world size.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

from kron.torch.optimizer import Kron


def _place(root: dict, path: tuple, value: Any) -> None:
    """Set ``value`` at ``path`` (dict keys are strings, list indices ints) inside ``root``,
    creating the dicts and lists on the way."""
    node: Any = root
    for key, following in itertools.pairwise(path):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = empty
            node = node[key]
        else:
            node = node.setdefault(key, empty)
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def load_template(
    optimizer: Kron,
    checkpoint_id: str | os.PathLike | None = None,
    *,
    key: str = "optim",
    storage_reader: Any = None,
) -> dict[str, Any]:
    """This rank's part of the optimizer state saved under ``key`` in a DCP checkpoint, allocated
    and ready for ``dcp.load`` to fill; then pass it to ``optimizer.load_state_dict``.

    Args:
      optimizer: a :class:`~kron.torch.distributed.DistributedKron` (the template holds the state
        of the parameters this rank owns under the current world size) or a plain
        :class:`kron.torch.Kron` (all of it).
      checkpoint_id: the checkpoint directory given to ``dcp.save``.
      key: the top-level key the optimizer's ``state_dict()`` was saved under. Default
        ``"optim"``.
      storage_reader: a DCP ``StorageReader`` to read the metadata with, instead of a
        ``FileSystemReader`` on ``checkpoint_id``.

    Returns:
      ``{"state": {"<position>": {...}}, "param_groups": [...]}`` with empty tensors and ``None``
      placeholders for the saved non-tensor values.

    Example::

        state = {"model": get_model_state_dict(model), "optim": load_template(opt, path)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        opt.load_state_dict(state["optim"])
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if storage_reader is None:
        if checkpoint_id is None:
            raise ValueError(
                "load_template needs a checkpoint_id or a storage_reader; got neither."
            )
        storage_reader = FileSystemReader(checkpoint_id)
    metadata = storage_reader.read_metadata()
    paths = metadata.planner_data
    if not isinstance(paths, dict):
        raise ValueError(
            "load_template needs a checkpoint saved with DCP's default planner (flattened state "
            f"dicts, whose metadata records each key's path); this one has planner_data={paths!r}."
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    owner = getattr(optimizer, "owner", None)
    wanted = {
        position for position, p in enumerate(params) if owner is None or owner(p) == optimizer.rank
    }
    template: dict[str, Any] = {}
    for flat, item in metadata.state_dict_metadata.items():
        path = paths.get(flat)
        if not path or path[0] != key or len(path) < 2:
            continue
        device = torch.device("cpu")
        if path[1] == "state":
            position = int(path[2])
            if position not in wanted:
                continue
            device = params[position].device
        # Everything else is taken: the param groups and the top-level entries such as the
        # ``seed`` the noise is drawn with (without it a resumed run draws other noise).
        if isinstance(item, TensorStorageMetadata):
            value: Any = torch.empty(item.size, dtype=item.properties.dtype, device=device)
        else:
            value = None  # a pickled value: dcp.load replaces the placeholder
        _place(template, path[1:], value)
    if "param_groups" not in template:
        found = sorted({paths[k][0] for k in metadata.state_dict_metadata if paths.get(k)})
        raise ValueError(
            f"The checkpoint has no optimizer state under key {key!r}; its top-level keys are "
            f"{found}."
        )
    template.setdefault("state", {})
    return template
