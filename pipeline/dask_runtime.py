"""Where parallel work runs: in-process, a local dask cluster, or a user's dask.distributed
scheduler. Results stream back in submission order, so writers stay sequential and
deterministic whatever the number of workers."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from distributed import Client, LocalCluster

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None = None) -> Iterator[Client | None]:
    """A client for ``scheduler`` if given, else a local cluster of ``workers`` processes.

    ``workers=0`` runs in this process without dask, which is what a debugger wants.
    """
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if workers <= 0:
        yield None
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


def map_in_order(fn: Callable[[T], R], items: Iterable[T], client: Client | None,
                 window: int = 0) -> Iterator[R]:
    """Yield ``fn(item)`` in input order, keeping at most ``window`` tasks in flight."""
    if client is None:
        yield from map(fn, items)
        return
    window = window or 4 * max(1, len(client.scheduler_info().get("workers", {})))
    pending: deque = deque()
    for item in items:
        pending.append(client.submit(fn, item, pure=False))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
