"""Server-side batching of concurrent Predict calls, after TF Serving's batching.

Like TF Serving's `SharedBatchScheduler`, one pool of `num_batch_threads` threads
serves every queue (one queue per model version and signature), so batches of the
segmenter and the classifier share the CPU instead of fighting over it.  A queue
forms a batch when it holds `max_batch_size` examples or its oldest task has waited
`batch_timeout_micros`; tasks are concatenated along dimension 0, run once and the
outputs split back.  Tasks whose non-batch dimensions or dtypes differ cannot be
concatenated (pad_variable_length_inputs is not implemented), so they go into
separate batches.  If a merged run fails, its tasks are re-run one by one so that one
bad request cannot fail its neighbours.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np

from melanoma_tf.serving.config import BatchingOptions
from melanoma_tf.serving.errors import ServingError

Tensors = dict[str, np.ndarray]
Runner = Callable[[Tensors], Tensors]


@dataclass
class _Task:
    inputs: Tensors
    size: int
    key: tuple
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Tensors | None = None
    error: BaseException | None = None


@dataclass
class QueueStats:
    """Counters for one queue: how much batching actually happened."""

    batches: int = 0
    tasks: int = 0
    examples: int = 0
    max_batch_tasks: int = 0
    unbatched_tasks: int = 0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "tasks": self.tasks,
            "examples": self.examples,
            "max_batch_tasks": self.max_batch_tasks,
            "unbatched_tasks": self.unbatched_tasks,
            "batch_size_histogram": dict(self.batch_size_histogram),
        }


def _batch_size(inputs: Tensors) -> int | None:
    sizes = {arr.shape[0] if arr.ndim else None for arr in inputs.values()}
    if len(sizes) != 1:
        return None
    return sizes.pop()


def _merge_key(inputs: Tensors) -> tuple:
    return tuple(sorted((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs.items()))


class BatchQueue:
    """The queue of one model version + signature inside a `SharedBatchScheduler`."""

    def __init__(self, scheduler: "SharedBatchScheduler", name: str, runner: Runner) -> None:
        self.name = name
        self._scheduler = scheduler
        self._runner = runner
        self._tasks: collections.deque[_Task] = collections.deque()
        self._queued_examples = 0
        self._closed = False
        self._stats = QueueStats()
        self._stats_lock = threading.Lock()

    def run(self, inputs: Tensors) -> Tensors:
        """Run `inputs` as part of a batch; blocks until this task's outputs are ready."""
        size = _batch_size(inputs)
        options = self._scheduler.options
        if size is None or size == 0 or size > options.max_batch_size or self._closed:
            with self._stats_lock:
                self._stats.unbatched_tasks += 1
            return self._runner(inputs)
        task = _Task(inputs=inputs, size=size, key=_merge_key(inputs), enqueued=time.monotonic())
        self._scheduler._enqueue(self, task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def close(self) -> None:
        """Stop taking new tasks into batches; queued ones are still processed."""
        self._scheduler._close(self)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return self._stats.as_dict()

    def _take_batch(self, max_batch_size: int) -> list[_Task]:
        first = self._tasks[0]
        batch, kept, total = [], collections.deque(), 0
        for task in self._tasks:
            if task.key == first.key and total + task.size <= max_batch_size:
                batch.append(task)
                total += task.size
            else:
                kept.append(task)
        self._tasks = kept
        self._queued_examples -= total
        return batch

    def _execute(self, tasks: list[_Task]) -> None:
        total = sum(task.size for task in tasks)
        try:
            if len(tasks) == 1:
                self._run_one(tasks[0])
            else:
                self._run_merged(tasks, total)
        finally:
            with self._stats_lock:
                stats = self._stats
                stats.batches += 1
                stats.tasks += len(tasks)
                stats.examples += total
                stats.max_batch_tasks = max(stats.max_batch_tasks, len(tasks))
                stats.batch_size_histogram[total] = stats.batch_size_histogram.get(total, 0) + 1
            if self._scheduler.on_batch is not None:
                self._scheduler.on_batch(self.name, total)
            for task in tasks:
                task.done.set()

    def _run_one(self, task: _Task) -> None:
        try:
            task.result = self._runner(task.inputs)
        except BaseException as exc:  # delivered to the waiting request thread
            task.error = exc

    def _run_merged(self, tasks: list[_Task], total: int) -> None:
        try:
            merged = {name: np.concatenate([t.inputs[name] for t in tasks], axis=0)
                      for name in tasks[0].inputs}
            outputs = self._runner(merged)
            if not all(arr.ndim >= 1 and arr.shape[0] == total for arr in outputs.values()):
                raise ValueError("outputs are not batch-major")
        except BaseException:
            for task in tasks:
                self._run_one(task)
            return
        start = 0
        for task in tasks:
            stop = start + task.size
            task.result = {name: arr[start:stop] for name, arr in outputs.items()}
            start = stop


class SharedBatchScheduler:
    """A fixed pool of batch threads shared by all queues (TF Serving's design)."""

    def __init__(self, options: BatchingOptions, on_batch: Callable[[str, int], None] | None = None) -> None:
        self.options = options
        self.on_batch = on_batch  # (queue name, examples) of every batch run, e.g. for metrics
        self._cond = threading.Condition()
        self._queues: list[BatchQueue] = []
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def queue(self, name: str, runner: Runner) -> BatchQueue:
        """Create the queue for one model version + signature."""
        batch_queue = BatchQueue(self, name, runner)
        with self._cond:
            self._queues.append(batch_queue)
        return batch_queue

    def stop(self) -> None:
        """Finish what is queued, then end the batch threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _enqueue(self, batch_queue: BatchQueue, task: _Task) -> None:
        capacity = self.options.max_enqueued_batches * self.options.max_batch_size
        with self._cond:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down")
            if batch_queue._queued_examples + task.size > capacity:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full")
            batch_queue._tasks.append(task)
            batch_queue._queued_examples += task.size
            self._cond.notify()

    def _close(self, batch_queue: BatchQueue) -> None:
        with self._cond:
            batch_queue._closed = True
            self._cond.notify_all()

    def _pick(self, now: float) -> tuple[BatchQueue, list[_Task]] | None:
        timeout = self.options.batch_timeout_micros / 1e6
        best = None
        for batch_queue in self._queues:
            if not batch_queue._tasks:
                continue
            oldest = batch_queue._tasks[0].enqueued
            ready = (self._stopping or batch_queue._closed
                     or batch_queue._queued_examples >= self.options.max_batch_size
                     or now - oldest >= timeout)
            if ready and (best is None or oldest < best._tasks[0].enqueued):
                best = batch_queue
        self._queues = [q for q in self._queues if q._tasks or not q._closed]
        if best is None:
            return None
        return best, best._take_batch(self.options.max_batch_size)

    def _wait_seconds(self, now: float) -> float | None:
        timeout = self.options.batch_timeout_micros / 1e6
        deadlines = [q._tasks[0].enqueued + timeout for q in self._queues if q._tasks]
        return max(1e-4, min(deadlines) - now) if deadlines else None

    def _worker(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    picked = self._pick(now)
                    if picked is not None:
                        break
                    if self._stopping:
                        return
                    self._cond.wait(self._wait_seconds(now))
            batch_queue, tasks = picked
            batch_queue._execute(tasks)
