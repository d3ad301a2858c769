"""Byte movement for the expert cache (mechanism only; engine.offload.cache decides what moves).

- ``SlotArena``: one preallocated buffer cut into equal slots, one cached expert blob per slot, on any torch
  device: on the CPU 4 KiB-aligned (optionally pinned, for copies to a GPU), on a GPU one device allocation.
  Allocated once at start-up; loads never allocate.
- ``BlobReader``: reads a blob ``(file, offset, padded_nbytes)`` from disk into a slot without leaving a second
  copy in the page cache: ``O_DIRECT`` (``os.preadv`` straight into the aligned slot) or a buffered read followed
  by ``posix_fadvise(DONTNEED)``; ``choose_read_mode`` picks the faster of the two by measurement at start-up.
  Several reads run in flight on a few worker threads (``preadv`` releases the GIL); they take queued reads
  urgent first (a layer is waiting on it), then in submission order, so a demand read never waits behind
  queued prefetches — only behind the reads already running.

Every byte read is counted in ``BlobReader.bytes_read``; ``reads`` counts the reads and ``busy_seconds`` the
wall time during which at least one read was running, so ``busy_seconds / reads`` is what one blob costs the
device when reads queue (the figure prefetch planning compares with a layer's compute).

- ``HostToDevice``: copies blobs from a host arena's slots into a device arena's slots, counting every byte in
  ``bytes_copied``. The seam between devices is this class: ``host_to_device`` returns the synchronous variant
  (plain ``copy_``) for a CPU device tier and ``CudaHostToDevice`` for a GPU one, whose copies run on a dedicated
  copy stream with one event per copy. Its callers keep the same protocol either way: ``copy`` into a device slot,
  ``ready`` before the compute stream reads that slot, ``release`` once the compute stream's use of slots is
  queued (a later copy into them waits for it), ``reuse_host`` before a host slot is overwritten (it waits for
  the copy reading it).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ALIGNMENT = 4096
DEFAULT_IO_THREADS = 4


class ReadMode(enum.Enum):
    """How blobs come off the disk."""

    DIRECT = "direct"  # O_DIRECT: the page cache is bypassed
    BUFFERED = "buffered"  # ordinary read, then posix_fadvise(DONTNEED) drops the pages it cached


HUGE_PAGE_MIN_BYTES = 4 << 20
"""Host buffers from this size up are mapped with transparent huge pages asked for (``huge_page_empty``)."""


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte sits on an ``alignment`` boundary (page-locked with
    ``pin_memory``, which needs CUDA). Unpinned buffers of HUGE_PAGE_MIN_BYTES and more come from
    ``huge_page_empty`` (page-aligned, so any ``alignment`` dividing the page size holds)."""
    if not pin_memory and nbytes >= HUGE_PAGE_MIN_BYTES and mmap.PAGESIZE % alignment == 0:
        return huge_page_empty(nbytes)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + nbytes]


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` (zero-filled, page-aligned) in an anonymous mapping advised for
    transparent huge pages (``MADV_HUGEPAGE``), which Linux grants with THP set to ``madvise`` or ``always``.

    Weights streamed at RAM speed cross a 4 KiB page every 4 KiB: with 2 MiB pages the TLB misses and page walks
    of a stream almost vanish (benchmarks/dense_linear.py: one-token expert groups 1.08 x the rate of ordinary
    memory). Where the
    kernel ignores the advice the buffer is an ordinary one. The tensor keeps the mapping alive.
    """
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError as error:  # a kernel built without THP
            logger.debug("transparent huge pages unavailable: %s", error)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def pack_tensors(tensors: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """Move the data of CPU ``tensors`` into one ``huge_page_empty`` buffer, each 64-byte aligned, in order;
    return the buffer (None when there is nothing to pack). Values, shapes and dtypes are unchanged; the old
    storages are freed as soon as nothing else refers to them (one tensor's worth of extra memory at a time)."""
    if not tensors:
        return None
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]
    buffer = huge_page_empty(sum(sizes))
    offset = 0
    with torch.no_grad():
        for tensor, size in zip(tensors, sizes):
            nbytes = tensor.numel() * tensor.element_size()
            view = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor.data)
            tensor.data = view
            offset += size
    return buffer


class SlotArena:
    """``num_slots`` slots of ``slot_bytes`` each (a multiple of ALIGNMENT), in one allocation on ``device``.

    On the CPU the allocation is ALIGNMENT-aligned (O_DIRECT reads land in it) and page-locked with ``pinned``
    (asynchronous copies to a GPU need that); on another device it is one uninitialized device tensor.
    """

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device | str = "cpu",
                 pinned: bool = False) -> None:
        if num_slots < 1:
            raise ValueError(f"a slot arena needs at least one slot, got {num_slots}")
        if slot_bytes % ALIGNMENT:
            raise ValueError(f"slot size {slot_bytes} is not a multiple of {ALIGNMENT}")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self._buffer = aligned_empty(num_slots * slot_bytes, pin_memory=pinned)
        elif pinned:
            raise ValueError(f"only host memory can be pinned, not {self.device}")
        else:
            self._buffer = torch.empty(num_slots * slot_bytes, dtype=torch.uint8, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena's slots."""
        return self.num_slots * self.slot_bytes

    @property
    def pinned(self) -> bool:
        """Whether the slots are page-locked host memory."""
        return self._buffer.is_pinned()

    def slot(self, index: int) -> torch.Tensor:
        """Slot ``index`` as a uint8 view [slot_bytes] (no copy)."""
        if not 0 <= index < self.num_slots:
            raise IndexError(f"slot {index} out of range [0, {self.num_slots})")
        return self._buffer[index * self.slot_bytes : (index + 1) * self.slot_bytes]


@dataclass(frozen=True)
class ReadRequest:
    """Read ``nbytes`` (a multiple of ALIGNMENT) at ``offset`` (aligned) of ``file`` into ``dest`` (aligned)."""

    file: Path
    offset: int
    nbytes: int
    dest: torch.Tensor  # uint8, at least nbytes


class BlobReader:
    """Reads aligned blobs into slots, ``mode`` chosen by the caller (see ``choose_read_mode``).

    ``io_threads`` workers take submitted reads urgent first, then in submission order. Files are opened once and
    kept open; ``close()`` waits for the queued reads, then releases the workers and the files.
    """

    def __init__(self, mode: ReadMode, io_threads: int = DEFAULT_IO_THREADS) -> None:
        self.mode = mode
        self.bytes_read = 0
        self.reads = 0
        self.busy_seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time the reading threads spent in reads (the kernel's copy, on some hosts)
        self._running = 0
        self._busy_since = 0.0
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._queued = threading.Condition()
        self._heap: list[tuple[int, int, ReadRequest | None, Future[None] | None]] = []
        self._order = itertools.count()
        self._workers = [threading.Thread(target=self._work, name=f"moeserve-io-{i}", daemon=True)
                         for i in range(io_threads)]
        for worker in self._workers:
            worker.start()

    def submit(self, request: ReadRequest, urgent: bool = False) -> Future[None]:
        """Queue a read; the future completes when the bytes are in ``request.dest`` (or holds the OSError).

        ``urgent`` reads (a layer waits on them) start before every queued non-urgent one."""
        future: Future[None] = Future()
        with self._queued:
            heapq.heappush(self._heap, (0 if urgent else 1, next(self._order), request, future))
            self._queued.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._queued:
                while not self._heap:
                    self._queued.wait()
                _, _, request, future = heapq.heappop(self._heap)
            if request is None:  # close(): every read queued before it has been taken
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                self.read(request)
            except BaseException as error:  # handed to the waiter, who decides what it means
                future.set_exception(error)
            else:
                future.set_result(None)

    def read(self, request: ReadRequest) -> None:
        """Read synchronously. Raises OSError naming the file on a short read or an I/O error."""
        if request.nbytes % ALIGNMENT or request.offset % ALIGNMENT or request.dest.data_ptr() % ALIGNMENT:
            raise ValueError(f"unaligned read of {request.file} at {request.offset} ({request.nbytes} bytes)")
        fd = self._fd(request.file)
        view = memoryview(request.dest[: request.nbytes].numpy())
        self._busy(+1)
        cpu = time.thread_time()
        try:
            self._read_all(fd, view, request)
        finally:
            cpu = time.thread_time() - cpu
            self._busy(-1)
        if self.mode is ReadMode.BUFFERED:
            os.posix_fadvise(fd, request.offset, request.nbytes, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += request.nbytes
            self.reads += 1
            self.cpu_seconds += cpu

    def _read_all(self, fd: int, view: memoryview, request: ReadRequest) -> None:
        done = 0
        while done < request.nbytes:
            got = os.preadv(fd, [view[done:]], request.offset + done)
            if got == 0:
                raise OSError(f"{request.file}: unexpected end of file at byte {request.offset + done} "
                              f"(reading {request.nbytes} bytes at {request.offset}); the store is truncated")
            done += got

    def _busy(self, change: int) -> None:
        """One read starts (+1) or ends (-1): the time with any read running accumulates in busy_seconds."""
        with self._lock:
            now = time.perf_counter()
            if self._running == 0:
                self._busy_since = now
            self._running += change
            if self._running == 0:
                self.busy_seconds += now - self._busy_since

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = open_for_reading(file, self.mode)
            return fd

    def close(self) -> None:
        """Wait for the queued reads, stop the workers, close every file."""
        with self._queued:
            for _ in self._workers:
                heapq.heappush(self._heap, (2, next(self._order), None, None))
            self._queued.notify_all()
        for worker in self._workers:
            worker.join()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def open_for_reading(file: Path, mode: ReadMode) -> int:
    """A read-only descriptor of ``file``, with O_DIRECT in DIRECT mode."""
    flags = os.O_RDONLY | (os.O_DIRECT if mode is ReadMode.DIRECT else 0)
    return os.open(file, flags)


def direct_io_supported(file: Path) -> bool:
    """Whether ``file``'s file system accepts O_DIRECT (tmpfs, for one, does not)."""
    try:
        fd = open_for_reading(file, ReadMode.DIRECT)
    except OSError:
        return False
    try:
        probe = aligned_empty(ALIGNMENT)
        os.preadv(fd, [memoryview(probe.numpy())], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def choose_read_mode(file: Path, offsets: list[int], nbytes: int, arena: SlotArena) -> ReadMode:
    """Time one cold read of each mode on blobs of ``file`` (into ``arena``'s slot 0); the faster mode wins.

    The buffered probe drops the blob's pages before and after reading, so both probes start from the disk.
    Falls back to BUFFERED when O_DIRECT is not supported; with fewer than two blobs, DIRECT is assumed.
    """
    if not direct_io_supported(file):
        logger.info("expert reads: O_DIRECT unsupported on %s; buffered reads + fadvise(DONTNEED)", file.parent)
        return ReadMode.BUFFERED
    if len(offsets) < 2:
        return ReadMode.DIRECT
    timings = {}
    for mode, offset in zip(ReadMode, offsets[:2]):
        reader = BlobReader(mode, io_threads=1)
        fd = open_for_reading(file, ReadMode.BUFFERED)
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        start = time.perf_counter()
        reader.read(ReadRequest(file, offset, nbytes, arena.slot(0)))
        timings[mode] = time.perf_counter() - start
        reader.close()
    chosen = min(timings, key=timings.get)
    logger.info("expert reads: %s (probe of %d bytes: %s)", chosen.value, nbytes,
                ", ".join(f"{m.value} {t * 1e3:.1f} ms" for m, t in timings.items()))
    return chosen


class HostToDevice:
    """Copies blobs from ``host`` slots into ``device`` slots, synchronously (``copy_``): the CPU variant.

    ``bytes_copied`` and ``copies`` count every copy. On a CPU device tier a copy has finished when ``copy``
    returns, so ``ready``, ``release`` and ``reuse_host`` have nothing to wait for; ``CudaHostToDevice`` gives
    them their meaning.
    """

    def __init__(self, host: SlotArena, device: SlotArena) -> None:
        if host.device.type != "cpu":
            raise ValueError(f"the source arena of host-to-device copies lives on the CPU, not {host.device}")
        if device.slot_bytes != host.slot_bytes:
            raise ValueError(f"host slots of {host.slot_bytes} bytes and device slots of {device.slot_bytes} differ")
        self.host = host
        self.device = device
        self.bytes_copied = 0
        self.copies = 0

    def copy(self, host_slot: int, device_slot: int, nbytes: int) -> None:
        """Copy the first ``nbytes`` of host slot ``host_slot`` into device slot ``device_slot``."""
        self.device.slot(device_slot)[:nbytes].copy_(self.host.slot(host_slot)[:nbytes])
        self.bytes_copied += nbytes
        self.copies += 1

    def ready(self, device_slot: int) -> None:
        """Order the compute stream's next reads of ``device_slot`` after the copy into it."""

    def release(self, device_slots: list[int]) -> None:
        """The compute stream's reads of ``device_slots`` are queued: a later copy into them waits for those."""

    def reuse_host(self, host_slot: int) -> None:
        """Wait until no copy reads ``host_slot`` any more, so it may be overwritten."""

    def synchronize(self) -> None:
        """Wait for every copy issued."""


class CudaHostToDevice(HostToDevice):
    """Asynchronous copies from pinned host slots into CUDA device slots on one dedicated copy stream.

    Every copy records an event on the copy stream. The compute stream (the current stream of the device when
    ``ready`` is called) waits on the event of a slot's last copy before it reads the slot; a copy into a device
    slot first makes the copy stream wait on the event ``release`` recorded on the compute stream after the
    slot's last use; a host slot is overwritten only after ``reuse_host`` synchronized the event of the last copy
    that read it.
    """

    def __init__(self, host: SlotArena, device: SlotArena) -> None:
        super().__init__(host, device)
        if not host.pinned:
            raise ValueError("asynchronous host-to-device copies need a pinned host arena")
        self.stream = torch.cuda.Stream(device=device.device)
        self._copied: dict[int, torch.cuda.Event] = {}  # device slot -> its last copy's event
        self._reading: dict[int, torch.cuda.Event] = {}  # host slot -> the event of the last copy from it
        self._released: dict[int, torch.cuda.Event] = {}  # device slot -> the compute stream after its last use

    def copy(self, host_slot: int, device_slot: int, nbytes: int) -> None:
        """Queue the copy on the copy stream, after the compute stream's queued reads of ``device_slot``."""
        released = self._released.pop(device_slot, None)
        if released is not None:
            self.stream.wait_event(released)
        with torch.cuda.stream(self.stream):
            self.device.slot(device_slot)[:nbytes].copy_(self.host.slot(host_slot)[:nbytes], non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._copied[device_slot] = event
        self._reading[host_slot] = event
        self.bytes_copied += nbytes
        self.copies += 1

    def ready(self, device_slot: int) -> None:
        """The compute stream waits on the slot's last copy (once: later work on it is ordered after the wait)."""
        event = self._copied.pop(device_slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device.device).wait_event(event)

    def release(self, device_slots: list[int]) -> None:
        """Record one event on the compute stream for ``device_slots``: copies into them wait for it."""
        if not device_slots:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device.device))
        for slot in device_slots:
            self._released[slot] = event

    def reuse_host(self, host_slot: int) -> None:
        """Block the calling thread until the last copy from ``host_slot`` has finished."""
        event = self._reading.pop(host_slot, None)
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        """Block until the copy stream is idle."""
        self.stream.synchronize()
        self._reading.clear()


def host_to_device(host: SlotArena, device: SlotArena) -> HostToDevice:
    """The copier for ``device``'s type: asynchronous on a CUDA stream for a GPU, synchronous ``copy_`` else."""
    if device.device.type == "cuda":
        return CudaHostToDevice(host, device)
    return HostToDevice(host, device)
