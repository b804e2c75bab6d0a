"""SP group registry: the process groups for every group layout a plan can name.

torch.distributed requires every rank to call `new_group` for every group, in the same
order, so the registry creates all of them once, collectively, at start-up, and hands out
the same group objects afterwards. A layout is a contiguous rank range (start, size). A plan
naming a layout that was not registered gets an error on the spot, before any collective
is issued, instead of a hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.distributed as dist


class UnknownGroupError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class NotInGroupError(ValueError):
    pass


@dataclass(frozen=True)
class SPGroup:
    """One SP group as this rank sees it."""

    start: int
    size: int
    rank: int  # this process's global rank
    pg: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)  # None for a group of one

    @property
    def index(self) -> int:
        """This rank's position in the group: which chunk of every sequence it holds."""
        return self.rank - self.start

    @property
    def ranks(self) -> list[int]:
        return list(range(self.start, self.start + self.size))

    @property
    def name(self) -> str:
        return f"{self.start}-{self.start + self.size - 1}"

    def global_rank(self, index: int) -> int:
        return self.start + index


SOLO = SPGroup(0, 1, 0, None)  # a rank on its own: whole sequences, no communication


def contiguous_layouts(world: int, per_node: int | None = None, sizes: Iterable[int] | None = None
                       ) -> list[tuple[int, int]]:
    """Every (start, size) a plan may name: groups up to a node inside one node, larger
    groups node-aligned whole nodes (the planner's rule); all ranges when per_node is None."""
    wanted = set(sizes) if sizes is not None else set(range(1, world + 1))
    out = []
    for size in sorted(wanted):
        if size < 1 or size > world:
            continue
        for start in range(0, world - size + 1):
            if per_node is not None:
                if size <= per_node and start // per_node != (start + size - 1) // per_node:
                    continue
                if size > per_node and (start % per_node or size % per_node):
                    continue
            out.append((start, size))
    return out


class GroupRegistry:
    def __init__(self, layouts: Iterable[tuple[int, int]] | None = None, *, backend: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        layouts = contiguous_layouts(self.world_size) if layouts is None else sorted(set(layouts))
        self._groups: dict[tuple[int, int], dist.ProcessGroup | None] = {}
        for start, size in layouts:  # the same order on every rank
            if size < 1 or start < 0 or start + size > self.world_size:
                raise ValueError(f"group layout (start={start}, size={size}) does not fit a world of "
                                 f"{self.world_size} ranks")
            if size == 1:
                self._groups[start, size] = None
            elif size == self.world_size:
                self._groups[start, size] = dist.group.WORLD
            else:
                self._groups[start, size] = dist.new_group(list(range(start, start + size)), backend=backend)

    @property
    def layouts(self) -> list[tuple[int, int]]:
        return list(self._groups)

    def get(self, start: int, size: int) -> SPGroup:
        """The group of ranks [start, start + size) for this rank."""
        if (start, size) not in self._groups:
            if size == 1 and 0 <= start < self.world_size:
                return SPGroup(start, 1, self.rank, None)
            raise UnknownGroupError(
                f"SP group of ranks {start}..{start + size - 1} (size {size}) was not registered; the registry "
                f"holds {len(self._groups)} layouts of sizes {sorted({s for _, s in self._groups})}: build it "
                f"with the layouts your plans use"
            )
        if not start <= self.rank < start + size:
            raise NotInGroupError(f"rank {self.rank} is not in SP group {start}..{start + size - 1}")
        return SPGroup(start, size, self.rank, self._groups[start, size])
