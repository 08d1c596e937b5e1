"""Batch segmentation on a Dask cluster (``lgseg segment INPUT --output OUT --cluster local|ADDRESS``).

Needs the ``cluster`` extra (``pip install "languageguidedseg[cluster]"``: Dask distributed). Each input is one task
that runs :func:`languageguidedseg.batch.segment_item` on a worker, which reads the image and writes the mask itself:
input and output paths must be the same on the workers as here (a shared file system). A worker plugin keeps the
loaded models in each worker, one cache per worker thread (a model is not shared between threads that segment at
once). Why Dask rather than Ray: docs/batch.md.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any, Optional

from distributed import Client, Future, LocalCluster, WorkerPlugin, get_worker

from .batch import BatchItem, BatchSettings, Row, failure_row, ignore_interrupts, segment_item, worker_threads
from .errors import LgsegError
from .runner import ModelCache

LOCAL = "local"  # --cluster local: a cluster on this machine, started and stopped by the batch
CONNECT_TIMEOUT_S = 30


class ModelsPlugin(WorkerPlugin):
    """Lives in each worker: the batch's settings and the models loaded there, one cache per worker thread.

    ``threads``: the torch thread count to set in each worker, only for workers that the batch started itself
    (``--cluster local``), which also ignore Ctrl+C (see :func:`languageguidedseg.batch.ignore_interrupts`); a
    cluster's own workers keep what it configures (Dask sets ``OMP_NUM_THREADS=1`` and runs one task per worker
    thread).
    """

    def __init__(self, settings: BatchSettings, threads: Optional[int] = None):
        self.settings = settings
        self.threads = threads
        self._local = threading.local()

    def setup(self, worker: Any) -> None:
        if self.threads is not None:
            ignore_interrupts()  # setup runs in the worker's main thread
            import torch

            torch.set_num_threads(self.threads)

    # The plugin travels pickled to the workers; its thread-local caches do not (each worker starts empty).
    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings, self.threads, self._local = state["settings"], state["threads"], threading.local()

    def segment(self, item: BatchItem) -> Row:
        models = getattr(self._local, "models", None)
        if models is None:
            models = self._local.models = ModelCache()
        return segment_item(item, self.settings, models)


def _segment_on_worker(item: BatchItem, plugin: str) -> Row:
    """The task: one input, with the models held by this worker's plugin."""
    return get_worker().plugins[plugin].segment(item)  # type: ignore[attr-defined]


class DaskEngine:
    """A :class:`languageguidedseg.batch.Engine` on a Dask cluster: ``address`` ``"local"`` starts one on this
    machine with ``workers`` single-threaded worker processes (the cores shared out among them), bound to 127.0.0.1;
    any other address is a running scheduler's (``tcp://host:8786``) to connect to. At most one input per worker
    thread is handed out at a time, so that stopping waits only for the images being segmented."""

    def __init__(self, address: str, settings: BatchSettings, workers: int):
        self._cluster: Optional[LocalCluster] = None
        self._futures: dict[str, tuple[int, BatchItem, Future]] = {}  # by the future's key
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()  # futures finished, put there by Dask's thread
        self._plugin = f"languageguidedseg-batch-{uuid.uuid4().hex[:8]}"
        self._capacity, self._capacity_at = 1, 0.0
        try:
            if address == LOCAL:
                self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                             host="127.0.0.1", dashboard_address=None)
                self._client = Client(self._cluster, set_as_default=False)
                plugin = ModelsPlugin(settings, threads=worker_threads(workers))
            else:
                try:
                    self._client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
                except ValueError as exc:  # e.g. no port, or an unknown scheme
                    raise LgsegError(f"'{address}' is not a Dask scheduler address ({exc}); give 'local' or an "
                                     "address such as tcp://host:8786", option="cluster") from exc
                except (OSError, TimeoutError) as exc:
                    raise LgsegError(f"cannot connect to the Dask scheduler at '{address}' ({exc.__class__.__name__}); "
                                     "check the address (e.g. tcp://host:8786) and that the scheduler is running",
                                     option="cluster") from exc
                plugin = ModelsPlugin(settings)
            self._client.register_plugin(plugin, name=self._plugin)
        except BaseException:
            self.close()
            raise

    @property
    def capacity(self) -> int:
        """Worker threads of the cluster, asked again every few seconds (workers may join or leave)."""
        if time.monotonic() - self._capacity_at > 5.0:
            self._capacity = max(1, sum(self._client.nthreads().values()))
            self._capacity_at = time.monotonic()
        return self._capacity

    def submit(self, index: int, item: BatchItem) -> None:
        future = self._client.submit(_segment_on_worker, item, self._plugin, pure=False,
                                     key=f"lgseg-{self._plugin[-8:]}-{index}")
        self._futures[str(future.key)] = (index, item, future)
        future.add_done_callback(self._done.put)

    def finished(self, timeout: float) -> list[tuple[int, Row]]:
        try:
            done = [self._done.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._done.empty():
            done.append(self._done.get())
        rows = []
        for future in done:
            if str(future.key) not in self._futures:
                continue  # cancelled by close
            index, item, _ = self._futures.pop(str(future.key))
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the worker died (KilledWorker): that input fails
                row = failure_row(item, f"the cluster could not segment it ({exc.__class__.__name__}: {exc})")
            rows.append((index, row))
        return rows

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            for _, _, future in self._futures.values():
                future.cancel()
            self._futures = {}
            if self._cluster is None:  # a shared cluster: let this batch's models go
                try:
                    client.unregister_worker_plugin(self._plugin)
                except Exception:  # noqa: BLE001, S110 - closing anyway; the scheduler may already be gone
                    pass
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

