"""Which tasks one replica polls when several share the work: ``--shard i/n``.

Rendezvous (highest-random-weight) hashing: a task scores every shard index with a hash of
(index, task ID) and belongs to the index with the highest score. Every replica reaches the same
answer from the task ID alone, without talking to the others, and going from n to n + 1 replicas
moves only the tasks whose best index becomes the new one: about 1 / (n + 1) of them, all to the
new replica. The hash is BLAKE2b from hashlib: Python's ``hash()`` of a string is salted per
process, so replicas would disagree.

Shard indices are 0-based, like StatefulSet pod ordinals: ``--shard 0/3``, ``1/3``, ``2/3``.
``--shard auto/3`` takes the index from the host name's ``-K`` suffix (``dcs-exporter-2`` → 2).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

AUTO = "auto"
_ORDINAL = re.compile(r"-(\d+)$")


class HasId(Protocol):
    """Anything with a task ID, such as config.TaskConfig."""

    @property
    def id(self) -> str:
        """The task ID."""
        ...


T = TypeVar("T", bound=HasId)


def _score(index: int, key: bytes) -> int:
    digest = hashlib.blake2b(
        key, digest_size=8, person=b"dcs-shard", salt=index.to_bytes(16, "big")
    )
    return int.from_bytes(digest.digest(), "big")


def shard_of(task_id: str, count: int) -> int:
    """The 0-based shard (of ``count``) that polls ``task_id``; IDs compare ignoring case."""
    if count < 1:
        raise ValueError("the number of shards must be at least 1")
    key = task_id.strip().lower().encode()
    # Ties (a 2^-64 chance) go to the lower index, so every replica still agrees.
    return max(range(count), key=lambda index: (_score(index, key), -index))


@dataclass(frozen=True)
class Shard:
    """This replica's part of the work: shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, task_id: str) -> bool:
        """Whether this replica polls ``task_id``."""
        return self.count == 1 or shard_of(task_id, self.count) == self.index

    def select(self, tasks: Iterable[T]) -> tuple[T, ...]:
        """The tasks this replica polls, in their original order."""
        return tuple(task for task in tasks if self.owns(task.id))


def host_name() -> str:
    """The pod name in Kubernetes (``HOSTNAME``), else the machine's host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def parse_shard(text: str, hostname: str | None = None) -> Shard:
    """Read ``i/n`` (0-based) or ``auto/n`` (``i`` from the ``-K`` suffix of the host name)."""
    index_text, sep, count_text = text.strip().partition("/")
    if not sep or not count_text.isdigit() or int(count_text) < 1:
        raise ValueError(f"{text!r}: expected INDEX/COUNT such as 0/3, or auto/3")
    count = int(count_text)
    if index_text == AUTO:
        name = hostname if hostname is not None else host_name()
        match = _ORDINAL.search(name)
        if match is None:
            raise ValueError(
                f"{text!r}: host name {name!r} does not end in -K (a StatefulSet pod ordinal)"
            )
        index = int(match.group(1))
        if index >= count:
            raise ValueError(
                f"{text!r}: host name {name!r} gives shard {index}, but there are only {count} "
                "(0-based); is the StatefulSet scaled beyond the shard count?"
            )
        return Shard(index, count)
    if not index_text.isdigit():
        raise ValueError(f"{text!r}: expected INDEX/COUNT such as 0/3, or auto/3")
    index = int(index_text)
    if index >= count:
        raise ValueError(f"{text!r}: shard indices are 0-based, so at most {count - 1}/{count}")
    return Shard(index, count)
