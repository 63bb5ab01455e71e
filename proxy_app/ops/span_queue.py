"""``SpanQueue``: OpenTelemetry's BatchSpanProcessor behind a gate that counts each span the collector never gets.

The batch processor exports from its own thread, so a slow or dead collector never holds the thread that ends a
span. When its queue is full it drops the oldest span without telling anyone; the gate here refuses the newest one
before that can happen and counts it, and it counts each span of a batch whose export failed, so ``dropped`` is
what never arrived. It knows nothing of calls or GenAI (otel.py), and imports the SDK, so only otel.py's SDK start
imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

BATCH_SIZE = 512  # spans per export request: the SDK's default, less when the queue is smaller


class SpanQueue(SpanProcessor):
    """A bounded span queue with a count of the spans dropped: queue full, export failed, or ended after shutdown."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int, shutdown_seconds: float) -> None:
        self.max_queue_size = max_queue_size
        self.pending = 0  # spans given to the batch processor and not yet to the exporter
        self.dropped = 0
        self.shutdown_seconds = shutdown_seconds
        self._is_closed = False
        self._lock = threading.Lock()
        self._exporter = _CountingExporter(exporter, self)
        batch = min(BATCH_SIZE, max_queue_size)
        self._batch = BatchSpanProcessor(self._exporter, max_queue_size=max_queue_size, max_export_batch_size=batch)

    def on_end(self, span: ReadableSpan) -> None:
        """Queue an ended span for export, or count it dropped when the queue is full; never waits."""
        if not span.context.trace_flags.sampled:
            return
        with self._lock:
            if self._is_closed or self.pending >= self.max_queue_size:
                self.dropped += 1
                return
            self.pending += 1
        self._batch.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every queued span now, from the calling thread."""
        return self._batch.force_flush(timeout_millis)

    def shutdown(self, seconds: float | None = None) -> None:
        """Export what is queued; after ``seconds`` (default: ``shutdown_seconds``) give up on a silent collector."""
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
        give_up = threading.Timer(self.shutdown_seconds if seconds is None else seconds, self._exporter.shutdown)
        give_up.daemon = True
        give_up.start()
        try:
            self._batch.shutdown()  # it shuts the exporter down too
        finally:
            give_up.cancel()
        with self._lock:  # what the batch processor still held when it stopped never reached the exporter
            self.dropped, self.pending = self.dropped + self.pending, 0

    def count_taken(self, count: int) -> None:
        """Take ``count`` spans off the queue's count: the batch processor has handed them to the exporter."""
        with self._lock:
            self.pending = max(self.pending - count, 0)

    def count_lost(self, count: int) -> None:
        """Count ``count`` spans of a failed export as dropped."""
        with self._lock:
            self.dropped += count


class _CountingExporter(SpanExporter):
    """Passes batches to the real exporter and tells the queue how each went; its shutdown runs once."""

    def __init__(self, exporter: SpanExporter, queue: SpanQueue) -> None:
        self._exporter, self._queue = exporter, queue
        self._is_shut = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._queue.count_taken(len(spans))
        result = SpanExportResult.FAILURE
        try:
            result = self._exporter.export(spans)
        finally:
            if result is not SpanExportResult.SUCCESS:
                self._queue.count_lost(len(spans))
        return result

    def shutdown(self) -> None:
        with self._lock:
            if self._is_shut:
                return
            self._is_shut = True
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)
