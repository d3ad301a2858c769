"""Byte movement: aligned slots, blob reads in both modes (O_DIRECT and buffered + fadvise), host-to-device copies
(the synchronous variant; tests/integration/test_offload_cuda.py has the CUDA one), exact accounting."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from engine.offload.tiers import (
    ALIGNMENT,
    DEFAULT_IO_THREADS,
    HUGE_PAGE_MIN_BYTES,
    BlobReader,
    CudaHostToDevice,
    HostToDevice,
    ReadMode,
    ReadRequest,
    SlotArena,
    aligned_empty,
    choose_read_mode,
    direct_io_supported,
    host_to_device,
    pack_tensors,
)


@pytest.fixture
def blob_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of three 8 KiB blobs of distinct random bytes."""
    data = torch.randint(0, 256, (3 * 2 * ALIGNMENT,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "experts.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data.numpy().tobytes()


def modes(path: Path) -> list[ReadMode]:
    return list(ReadMode) if direct_io_supported(path) else [ReadMode.BUFFERED]


@pytest.mark.parametrize("nbytes", [1, ALIGNMENT, 3 * ALIGNMENT + 5, HUGE_PAGE_MIN_BYTES + 5])
def test_aligned_empty_is_aligned(nbytes: int) -> None:
    buffer = aligned_empty(nbytes)
    assert buffer.data_ptr() % ALIGNMENT == 0 and buffer.numel() == nbytes and buffer.dtype == torch.uint8


def test_packed_tensors_keep_their_values_in_one_aligned_buffer() -> None:
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype), requires_grad=False)
               for shape, dtype in (((3, 7), torch.bfloat16), ((5,), torch.float32), ((2, 3, 4), torch.float16))]
    before = [t.detach().clone() for t in tensors]
    buffer = pack_tensors(tensors)
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for tensor, original in zip(tensors, before):
        assert torch.equal(tensor, original) and tensor.dtype == original.dtype
        assert start <= tensor.data_ptr() < end and tensor.data_ptr() % 64 == 0
    assert pack_tensors([]) is None


def test_arena_slots_are_disjoint_aligned_views() -> None:
    arena = SlotArena(3, 2 * ALIGNMENT)
    assert arena.nbytes == 6 * ALIGNMENT
    for i in range(3):
        assert arena.slot(i).data_ptr() % ALIGNMENT == 0 and arena.slot(i).numel() == 2 * ALIGNMENT
    arena.slot(0).zero_()
    arena.slot(2).zero_()
    arena.slot(1).fill_(7)
    assert int(arena.slot(0).sum()) == int(arena.slot(2).sum()) == 0 and bool((arena.slot(1) == 7).all())
    assert arena.slot(1).data_ptr() - arena.slot(0).data_ptr() == 2 * ALIGNMENT
    with pytest.raises(IndexError):
        arena.slot(3)
    with pytest.raises(ValueError, match="multiple of 4096"):
        SlotArena(1, ALIGNMENT + 1)


def test_reads_land_exactly_and_are_counted(blob_file: tuple[Path, bytes]) -> None:
    path, data = blob_file
    arena = SlotArena(2, 2 * ALIGNMENT)
    for mode in modes(path):
        reader = BlobReader(mode)
        futures = [reader.submit(ReadRequest(path, blob * 2 * ALIGNMENT, 2 * ALIGNMENT, arena.slot(slot)))
                   for slot, blob in ((0, 2), (1, 0))]
        for future in futures:
            future.result()
        assert bytes(arena.slot(0).numpy()) == data[4 * ALIGNMENT : 6 * ALIGNMENT]
        assert bytes(arena.slot(1).numpy()) == data[: 2 * ALIGNMENT]
        assert reader.bytes_read == 4 * ALIGNMENT
        # CPU time of the reading threads: never more than the threads could spend while reads ran
        assert 0.0 <= reader.cpu_seconds <= DEFAULT_IO_THREADS * reader.busy_seconds + 0.01
        reader.close()


def test_a_truncated_file_is_an_error_naming_it(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    os.truncate(path, 5 * ALIGNMENT)
    reader = BlobReader(ReadMode.BUFFERED)
    with pytest.raises(OSError, match="experts.bin.*truncated"):
        reader.read(ReadRequest(path, 4 * ALIGNMENT, 2 * ALIGNMENT, SlotArena(1, 2 * ALIGNMENT).slot(0)))
    assert reader.bytes_read == 0
    reader.close()


def test_unaligned_reads_are_refused(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    reader = BlobReader(ReadMode.BUFFERED)
    with pytest.raises(ValueError, match="unaligned"):
        reader.read(ReadRequest(path, 100, ALIGNMENT, aligned_empty(ALIGNMENT)))
    reader.close()


def test_read_mode_is_chosen_by_measurement(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    mode = choose_read_mode(path, [0, 2 * ALIGNMENT], 2 * ALIGNMENT, SlotArena(1, 2 * ALIGNMENT))
    assert mode in modes(path)


class GatedReader(BlobReader):
    """A reader whose first read waits for ``gate``, so reads queue up behind it; records the order reads run."""

    def __init__(self) -> None:
        self.gate, self.started = threading.Event(), threading.Event()
        self.order: list[int] = []
        super().__init__(ReadMode.BUFFERED, io_threads=1)

    def read(self, request: ReadRequest) -> None:
        if not self.started.is_set():
            self.started.set()
            self.gate.wait(timeout=10)
        self.order.append(request.offset // (2 * ALIGNMENT))
        super().read(request)


def test_urgent_reads_start_before_queued_prefetches(blob_file: tuple[Path, bytes]) -> None:
    path, data = blob_file
    arena = SlotArena(3, 2 * ALIGNMENT)
    reader = GatedReader()
    requests = [ReadRequest(path, blob * 2 * ALIGNMENT, 2 * ALIGNMENT, arena.slot(blob)) for blob in range(3)]
    futures = [reader.submit(requests[0])]
    assert reader.started.wait(timeout=10)
    futures += [reader.submit(requests[1]), reader.submit(requests[2], urgent=True)]
    reader.gate.set()
    for future in futures:
        future.result(timeout=10)
    assert reader.order == [0, 2, 1], "the urgent read overtook the queued one, not the one running"
    assert bytes(arena.slot(1).numpy()) == data[2 * ALIGNMENT:4 * ALIGNMENT]
    reader.close()


def test_a_failed_read_reaches_its_waiter_and_the_reader_goes_on(blob_file: tuple[Path, bytes]) -> None:
    path, _ = blob_file
    reader = BlobReader(ReadMode.BUFFERED, io_threads=1)
    arena = SlotArena(1, 2 * ALIGNMENT)
    failed = reader.submit(ReadRequest(path, 10 * ALIGNMENT, 2 * ALIGNMENT, arena.slot(0)))
    with pytest.raises(OSError, match="truncated"):
        failed.result(timeout=10)
    reader.submit(ReadRequest(path, 0, 2 * ALIGNMENT, arena.slot(0))).result(timeout=10)
    reader.close()
    assert reader.bytes_read == 2 * ALIGNMENT


def test_host_to_device_copies_exactly_the_bytes_asked_and_counts_them() -> None:
    host, device = SlotArena(2, 2 * ALIGNMENT), SlotArena(3, 2 * ALIGNMENT, device="cpu")
    copier = host_to_device(host, device)
    assert type(copier) is HostToDevice, "a CPU device tier copies synchronously"
    host.slot(0).copy_(torch.arange(2 * ALIGNMENT) % 251)
    device.slot(2).fill_(9)
    copier.copy(0, 2, ALIGNMENT)
    copier.ready(2)
    assert torch.equal(device.slot(2)[:ALIGNMENT], host.slot(0)[:ALIGNMENT]), "the bytes asked for, at once"
    assert bool((device.slot(2)[ALIGNMENT:] == 9).all()), "nothing beyond them"
    copier.copy(0, 1, 2 * ALIGNMENT)
    assert (copier.bytes_copied, copier.copies) == (3 * ALIGNMENT, 2)


def test_host_to_device_refuses_mismatched_arenas() -> None:
    with pytest.raises(ValueError, match="differ"):
        HostToDevice(SlotArena(1, ALIGNMENT), SlotArena(1, 2 * ALIGNMENT))
    with pytest.raises(ValueError, match="lives on the CPU"):
        HostToDevice(SlotArena(1, ALIGNMENT, device="meta"), SlotArena(1, ALIGNMENT))
    with pytest.raises(ValueError, match="pinned"):
        CudaHostToDevice(SlotArena(1, ALIGNMENT), SlotArena(1, ALIGNMENT))


def test_only_host_arenas_can_be_pinned() -> None:
    with pytest.raises(ValueError, match="only host memory can be pinned"):
        SlotArena(1, ALIGNMENT, device="meta", pinned=True)
    arena = SlotArena(2, ALIGNMENT, device="meta")
    assert arena.slot(1).device.type == "meta" and arena.nbytes == 2 * ALIGNMENT and not arena.pinned
