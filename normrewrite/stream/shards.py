"""Writing the rewritten tensors as sharded safetensors, one shard at a time.

Which tensor goes into which file is decided up front, from the ``meta`` shapes, by
``huggingface_hub``'s :func:`~huggingface_hub.split_torch_state_dict_into_shards` (the layout and
file names ``save_pretrained`` uses); tensors arrive in any order, are held until their shard is
complete, and the shard is then written with ``safetensors``' :func:`~safetensors.torch.save_file`
and dropped. Memory: at most the shards still incomplete — with tensors arriving in the plan's
order, one shard (``max_shard_bytes``) plus the few tensors a multi-output recipe wrote ahead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from normrewrite.errors import EmitError, PassError
from normrewrite.load.checkpoint import INDEX

# safetensors' save_file holds one shard in memory: the shard size bounds a streamed write's peak RSS
DEFAULT_MAX_SHARD_BYTES = 256 << 20


class ShardWriter:
    """``slots`` are ``(key, dtype, shape)`` in the order the shards are filled. :meth:`close`
    checks every slot was written and writes the index when there are several shards."""

    def __init__(
        self,
        directory: Path,
        slots: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        from huggingface_hub import split_torch_state_dict_into_shards

        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.slots = {key: (dtype, tuple(shape)) for key, dtype, shape in slots}
        planned = {
            key: torch.empty(shape, dtype=dtype, device="meta")
            for key, (dtype, shape) in self.slots.items()
        }
        self.split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_bytes)
        self.names = list(self.split.filename_to_tensors)
        self.waiting = {name: set(keys) for name, keys in self.split.filename_to_tensors.items()}
        self.held: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.names}
        self.total_bytes = int(self.split.metadata["total_size"])

    def write(self, key: str, value: torch.Tensor) -> int:
        """Take the value of ``key``; write its shard when this completes it. Returns its bytes."""
        dtype, shape = self.slots[key]
        name = self.split.tensor_to_filename[key]
        if key not in self.waiting[name]:
            raise PassError(f"tensor {key} written twice")
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise PassError(
                f"tensor {key}: replay gave {value.dtype}{list(value.shape)}, the meta graph planned "
                f"{dtype}{list(shape)} (a pass's recipe is not a pure function of its inputs)"
            )
        self.held[name][key] = value.detach().cpu().contiguous()
        self.waiting[name].discard(key)
        if not self.waiting[name]:
            self._flush(name)
        return value.numel() * value.element_size()

    def _flush(self, name: str) -> None:
        from safetensors.torch import save_file

        tensors = self.held.pop(name)
        try:
            save_file(tensors, str(self.directory / name), metadata=self.metadata)
        except OSError as e:
            raise EmitError(f"writing {name} failed: {e.strerror or e}") from e

    def close(self) -> dict[str, str]:
        """Check every tensor was written; write the index if sharded. Returns the HF
        ``weight_map`` (key → shard file)."""
        missing = sorted(k for keys in self.waiting.values() for k in keys)
        self.held.clear()
        if missing:
            raise EmitError(f"{len(missing)} tensors were never written (first: {missing[0]})")
        weight_map = dict(sorted(self.split.tensor_to_filename.items()))
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2))
        return weight_map

    def abort(self) -> None:
        self.held.clear()
