"""The prepared expert store: every routed expert of a checkpoint as one contiguous, 4 KiB-aligned blob on disk.

A store directory (format ``FORMAT_VERSION``) holds:

- ``experts-{precision}-L{layer:05d}.bin``: one data file per MoE layer and precision. Expert ``e``'s blob starts at
  a multiple of ``BLOB_ALIGN`` (4096) bytes and is padded with zeros to a multiple of it; blobs follow each other in
  expert order. Inside a blob the tensors come in the order ``gate_up``, ``down`` [, ``gate_up_bias``,
  ``down_bias``], each starting at a multiple of ``TENSOR_ALIGN`` (64) bytes from the blob's start, each in exactly
  the layout of transformers' fused experts module (``experts.gate_up_proj[e]`` = cat(gate, up) [2I, H] and
  ``experts.down_proj[e]`` [H, I]; gpt_oss's transposed [H, 2I] and [I, H] with biases [2I] and [H]), so a slot
  holding a blob's bytes is viewed as the expert's weights without a copy (``ExpertStore.view``).
- ``resident.safetensors``: every other checkpoint tensor (embeddings, attention, norms, routers, shared experts,
  dense layers), under its original checkpoint name, dtype and bytes.
- ``manifest.json``, written last and atomically (temp file, fsync, rename, directory fsync, after the data files
  are fsynced): a store without it is incomplete. Keys: ``format``, ``format_version``, ``fingerprint``,
  ``source`` (``model_dir``, ``config_sha256``, ``shards``: name, size, mtime_ns), ``model_type``, ``num_layers``,
  ``moe_layers``, ``num_experts`` (per MoE layer, keys are layer numbers as strings), ``precisions``,
  ``source_quantization`` (null, ``mxfp4`` or ``fp8``), ``transposed`` (gpt_oss layout), ``alignment``
  (``blob``, ``tensor``), ``checksum`` (``crc32``), ``files`` (name, nbytes), ``resident`` (file, nbytes,
  num_tensors) and ``blobs``: per blob ``layer``, ``expert``, ``precision``, ``file``, ``offset``, ``nbytes``
  (unpadded), ``padded_nbytes``, ``checksum`` (zlib.crc32 of the unpadded bytes) and ``tensors``: ``role``,
  ``dtype`` (torch name, e.g. ``bfloat16``), ``shape``, ``offset`` (within the blob), ``nbytes``.

``prepare`` streams the checkpoint tensor by tensor (``safe_open``; per-expert slices of fused 3-D stacks), so its
anonymous memory stays within a few tensors. Quantized experts (gpt_oss MXFP4, DeepSeek-V3 block FP8) are
dequantized to the config's compute dtype (bfloat16 unless the config names another floating dtype); resident
tensors are copied as the checkpoint stores them. The precision ``native`` is the only one so far.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.offload.quant import MXFP4_GROUP, dequantize_fp8_blocks, dequantize_mxfp4

logger = logging.getLogger(__name__)

FORMAT = "moeserve-expert-store"
FORMAT_VERSION = 1
BLOB_ALIGN = 4096
TENSOR_ALIGN = 64
PRECISIONS = ("native",)
ROLES = ("gate_up", "down", "gate_up_bias", "down_bias")
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
LOCK = "prepare.lock"
DATA_FILE_PATTERN = re.compile(r"experts-[a-z0-9_]+-L\d{5}\.bin")
DEFAULT_FP8_BLOCK = (128, 128)

# safetensors dtype codes -> torch dtypes (element sizes and views).
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Per-expert checkpoint tensors: Mixtral's w1 (gate) / w3 (up) / w2 (down); the others' gate/up/down_proj.
PER_EXPERT_TENSOR = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.[^.]+\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<kind>weight|weight_scale_inv)$"
)
# Fused 3-D (and bias 2-D) stacks over experts: gpt_oss's gate_up_proj / down_proj, plain or MXFP4 blocks+scales.
FUSED_TENSOR = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.[^.]+\.experts\.(?P<proj>gate_up_proj|down_proj)"
    r"(?P<suffix>_bias|_blocks|_scales)?$"
)
LAYER_OF_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT_TENSOR = re.compile(r"\.experts\.")
# proj name -> (role, part): a part of a role's rows, concatenated gate before up.
PER_EXPERT_PARTS = {
    "w1": ("gate_up", "gate"), "gate_proj": ("gate_up", "gate"), "w3": ("gate_up", "up"), "up_proj": ("gate_up", "up"),
    "w2": ("down", "whole"), "down_proj": ("down", "whole"),
}
PART_ORDER = {"gate": 0, "up": 1, "whole": 0}
PREPARE_HINT = "run `moeserve prepare MODEL --out {root}`"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, stale or corrupt; the message says what and how to fix it."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a blob: its role, dtype, shape and byte range relative to the blob's start."""

    role: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlobEntry:
    """One expert's blob: where it lies (absolute file, 4 KiB-aligned offset), its sizes, checksum and tensors."""

    layer: int
    expert: int
    precision: str
    file: Path
    offset: int
    nbytes: int
    padded_nbytes: int
    checksum: int
    tensors: tuple[TensorEntry, ...]


class ExpertStore:
    """A complete, validated store, read through its manifest. Build one with ``open``, ``prepare`` or
    ``ensure_store``; moving bytes is the tiers' business, this class only says where they are and what they mean.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.fingerprint: str = manifest["fingerprint"]
        self.model_type: str = manifest["model_type"]
        self.num_layers: int = manifest["num_layers"]
        self.moe_layers: tuple[int, ...] = tuple(manifest["moe_layers"])
        self.num_experts: dict[int, int] = {int(layer): count for layer, count in manifest["num_experts"].items()}
        self.precisions: tuple[str, ...] = tuple(manifest["precisions"])
        self.source_quantization: str | None = manifest["source_quantization"]
        self.transposed: bool = manifest["transposed"]
        self.resident_path = root / manifest["resident"]["file"]
        self._blobs = {(b.layer, b.expert, b.precision): b for b in map(self._blob_entry, manifest["blobs"])}

    def _blob_entry(self, record: dict[str, Any]) -> BlobEntry:
        tensors = tuple(
            TensorEntry(t["role"], _torch_dtype(t["dtype"]), tuple(t["shape"]), t["offset"], t["nbytes"])
            for t in record["tensors"]
        )
        return BlobEntry(
            layer=record["layer"], expert=record["expert"], precision=record["precision"],
            file=self.root / record["file"], offset=record["offset"], nbytes=record["nbytes"],
            padded_nbytes=record["padded_nbytes"], checksum=record["checksum"], tensors=tensors,
        )

    @classmethod
    def open(cls, store_dir: str | Path, model_dir: str | Path | None = None) -> ExpertStore:
        """Open the complete store in ``store_dir``.

        Raises StoreError when the manifest is missing (incomplete store), unreadable or of another format
        version, when a data file is missing or not of its recorded size, or — with ``model_dir`` — when the store
        was prepared from a different checkpoint (fingerprint mismatch).
        """
        root = Path(store_dir).resolve()
        manifest = _read_manifest(root)
        try:
            _check_files(root, manifest)
            store = cls(root, manifest)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed {root / MANIFEST} ({exc!r}); {PREPARE_HINT.format(root=root)} again") from exc
        if model_dir is not None and (current := fingerprint(model_dir)) != manifest["fingerprint"]:
            raise StoreError(
                f"the expert store in {root} was prepared from a different checkpoint than {model_dir} "
                f"(fingerprint {manifest['fingerprint'][:16]}, the checkpoint's is {current[:16]}); "
                f"{PREPARE_HINT.format(root=root).replace('MODEL', str(model_dir))} again"
            )
        return store

    def blob(self, layer: int, expert: int, precision: str = "native") -> BlobEntry:
        """The blob of (layer, expert, precision); KeyError naming the key when the store has none."""
        try:
            return self._blobs[layer, expert, precision]
        except KeyError:
            raise KeyError(
                f"no blob for layer {layer}, expert {expert}, precision {precision!r} in {self.root} "
                f"(MoE layers {list(self.moe_layers)}, precisions {list(self.precisions)})"
            ) from None

    def blobs(self, precision: str = "native") -> list[BlobEntry]:
        """Every blob of ``precision``, in (layer, expert) order."""
        return sorted((b for b in self._blobs.values() if b.precision == precision), key=lambda b: (b.layer, b.expert))

    @property
    def max_blob_bytes(self) -> int:
        """The largest padded blob: the slot size that holds any expert."""
        return max(b.padded_nbytes for b in self._blobs.values())

    @property
    def total_expert_bytes(self) -> int:
        """Padded bytes of every blob of every precision: what holding all of them in slots takes."""
        return sum(b.padded_nbytes for b in self._blobs.values())

    @staticmethod
    def view(entry: BlobEntry, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views, by role, into ``buffer`` (1-D contiguous uint8, at least ``entry.nbytes``) that holds the
        blob's bytes. No copies: the views share ``buffer``'s storage (which must be 64-byte aligned for dtypes
        wider than a byte, as slots are).
        """
        _check_buffer(entry, buffer)
        return {
            t.role: buffer.narrow(0, t.offset, t.nbytes).view(t.dtype).view(t.shape)
            for t in entry.tensors
        }

    def verify(self, entry: BlobEntry, buffer: torch.Tensor) -> None:
        """Check the blob's bytes in ``buffer`` (CPU uint8) against the manifest's crc32; StoreError naming the
        file, layer and expert when they differ.
        """
        _check_buffer(entry, buffer)
        actual = zlib.crc32(buffer[: entry.nbytes].numpy())
        if actual != entry.checksum:
            raise StoreError(
                f"corrupt expert blob: layer {entry.layer}, expert {entry.expert} ({entry.precision}) in "
                f"{entry.file} at offset {entry.offset}: crc32 {actual:#010x}, manifest says {entry.checksum:#010x}; "
                f"{PREPARE_HINT.format(root=self.root)} again"
            )


def _check_buffer(entry: BlobEntry, buffer: torch.Tensor) -> None:
    """Raise ValueError unless ``buffer`` is a 1-D contiguous uint8 tensor holding at least the blob's bytes."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"blob buffers are 1-D contiguous uint8 tensors, not {buffer.dtype} {tuple(buffer.shape)}")
    if buffer.numel() < entry.nbytes:
        raise ValueError(f"buffer of {buffer.numel()} bytes cannot hold a blob of {entry.nbytes}")


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``bfloat16``); StoreError for anything that is not a dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"manifest names an unknown dtype {name!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of ``root``; StoreError for a missing, unreadable or foreign-version one."""
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(
            f"no complete expert store in {root}: {MANIFEST} is missing (prepare never ran there or was "
            f"interrupted); {PREPARE_HINT.format(root=root)}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"unreadable {path} ({exc}); {PREPARE_HINT.format(root=root)} again") from exc
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("format_version")) != (
        FORMAT, FORMAT_VERSION
    ):
        raise StoreError(
            f"{path} is not a moeserve expert store of format version {FORMAT_VERSION} "
            f"(found {str(manifest)[:80]}); "
            f"{PREPARE_HINT.format(root=root)} again"
        )
    return manifest


def _check_files(root: Path, manifest: dict[str, Any]) -> None:
    """StoreError naming the first data or resident file that is missing or not of its recorded size."""
    expected = [(f["name"], f["nbytes"]) for f in manifest["files"]]
    expected.append((manifest["resident"]["file"], manifest["resident"]["nbytes"]))
    for name, nbytes in expected:
        path = root / name
        size = path.stat().st_size if path.is_file() else None
        if size != nbytes:
            found = "missing" if size is None else f"{size} bytes"
            raise StoreError(
                f"store file {path} is {found}, the manifest expects {nbytes} bytes (truncated or replaced); "
                f"{PREPARE_HINT.format(root=root)} again"
            )


# ----------------------------------------------------------------------------------------------------- source


def checkpoint_shards(model_dir: Path) -> list[Path]:
    """The safetensors shards of ``model_dir``: those of ``model.safetensors.index.json``, else every
    ``*.safetensors`` file; FileNotFoundError when there is none.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / name for name in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {model_dir}")
    return shards


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def _source_record(model_dir: Path) -> dict[str, Any]:
    """What the fingerprint covers: config.json's sha256 and each shard's name, size and mtime_ns."""
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    shards = []
    for shard in checkpoint_shards(model_dir):
        stat = shard.stat()
        shards.append({"name": shard.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"model_dir": str(model_dir), "config_sha256": config_sha, "shards": shards}


def _fingerprint_of(source: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\n{source['config_sha256']}\n".encode())
    for shard in source["shards"]:
        digest.update(f"{shard['name']}\t{shard['size']}\t{shard['mtime_ns']}\n".encode())
    return digest.hexdigest()


def fingerprint(model_dir: str | Path) -> str:
    """sha256 hex of the store format version, config.json's bytes and each shard's name, size and mtime_ns."""
    model_dir = Path(model_dir).resolve()
    _read_config(model_dir)
    return _fingerprint_of(_source_record(model_dir))


@dataclass(frozen=True)
class SourceTensor:
    """One checkpoint tensor, from its shard's header: name, shard, safetensors dtype code, shape."""

    name: str
    shard: Path
    code: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        if self.code not in SAFETENSORS_DTYPES:
            raise StoreError(f"checkpoint tensor {self.name} has dtype {self.code}, which moeserve cannot read")
        return SAFETENSORS_DTYPES[self.code]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _list_tensors(shards: list[Path]) -> list[SourceTensor]:
    """Every tensor of every shard, in shard then header order, read from headers only."""
    tensors = []
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors.append(SourceTensor(name, shard, piece.get_dtype(), tuple(piece.get_shape())))
    return tensors


# ----------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Piece:
    """The bytes one checkpoint tensor gives one blob tensor (a role): all of it, or its gate or up rows.

    ``decode`` is ``copy`` (bytes as stored), ``fp8`` (with ``scale``) or ``mxfp4`` (``source`` the blocks,
    ``scale`` the scales); ``index`` selects the expert of a fused stack (None for per-expert tensors).
    """

    role: str
    part: str
    decode: str
    source: SourceTensor
    scale: SourceTensor | None
    index: int | None
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PlannedBlob:
    """A blob's place in its data file, its tensors, and where each piece's bytes go (offsets in the file)."""

    layer: int
    expert: int
    precision: str
    file: str
    offset: int
    nbytes: int
    padded_nbytes: int
    tensors: tuple[TensorEntry, ...]
    writes: tuple[tuple[Piece, int], ...]


@dataclass
class Plan:
    """Everything prepare writes, decided from the checkpoint headers before a byte is read."""

    blobs: list[PlannedBlob]
    resident: list[SourceTensor]
    consumed: set[str]  # scale tensors read together with their weights
    skipped: list[SourceTensor]  # tensors of layers beyond num_hidden_layers (e.g. DeepSeek-V3's MTP layer)
    quantization: str | None
    transposed: bool


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def _compute_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype dequantized experts are stored in: the config's floating dtype, else bfloat16."""
    name = config.get("dtype") or config.get("torch_dtype") or _text_config(config).get("torch_dtype")
    return COMPUTE_DTYPES.get(name, torch.bfloat16)


def _fp8_block(config: dict[str, Any]) -> tuple[int, int]:
    quantization = config.get("quantization_config") or {}
    return tuple(quantization.get("weight_block_size") or DEFAULT_FP8_BLOCK)


def _expert_pieces(
    tensor: SourceTensor, by_name: dict[str, SourceTensor], dtype: torch.dtype, fp8_block: tuple[int, int]
) -> list[tuple[int, int, Piece]] | None:
    """(layer, expert, piece) for each expert ``tensor`` feeds; [] for a scale read with its weight; None for a
    tensor that is not a routed expert's. StoreError for an expert tensor of an unknown kind.
    """
    if match := PER_EXPERT_TENSOR.search(tensor.name):
        if match["kind"] == "weight_scale_inv":
            return []
        piece = _per_expert_piece(tensor, match, by_name, dtype, fp8_block)
        return [(int(match["layer"]), int(match["expert"]), piece)]
    if match := FUSED_TENSOR.search(tensor.name):
        if match["suffix"] == "_scales":
            return []
        return [(int(match["layer"]), e, piece) for e, piece in enumerate(_fused_pieces(tensor, match, by_name, dtype))]
    if EXPERT_TENSOR.search(tensor.name):
        raise StoreError(
            f"unrecognized routed-expert tensor {tensor.name} {tensor.code}{list(tensor.shape)}: prepare knows "
            "per-expert w1/w2/w3 and gate_proj/up_proj/down_proj weights (optionally FP8 with weight_scale_inv) "
            "and fused gate_up_proj/down_proj stacks (optionally MXFP4 _blocks/_scales, with _bias)"
        )
    return None


def _per_expert_piece(
    tensor: SourceTensor, match: re.Match[str], by_name: dict[str, SourceTensor], dtype: torch.dtype,
    fp8_block: tuple[int, int],
) -> Piece:
    """The piece of a per-expert 2-D weight: copied, or dequantized when it is FP8 with a block scale."""
    role, part = PER_EXPERT_PARTS[match["proj"]]
    scale = by_name.get(tensor.name.removesuffix("weight") + "weight_scale_inv")
    if scale is not None:
        rows, cols = tensor.shape
        expected = (-(-rows // fp8_block[0]), -(-cols // fp8_block[1]))
        if scale.shape != expected:
            raise StoreError(f"{scale.name} has shape {list(scale.shape)}; {fp8_block[0]}x{fp8_block[1]} blocks "
                             f"(quantization_config.weight_block_size) of {tensor.name} need {list(expected)}")
        return Piece(role, part, "fp8", tensor, scale, None, dtype, tensor.shape)
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1:
        raise StoreError(f"FP8 expert weight {tensor.name} has no {tensor.name}_scale_inv in the checkpoint")
    return Piece(role, part, "copy", tensor, None, None, tensor.dtype, tensor.shape)


def _fused_pieces(
    tensor: SourceTensor, match: re.Match[str], by_name: dict[str, SourceTensor], dtype: torch.dtype
) -> list[Piece]:
    """One piece per expert of a fused stack [E, ...]: a slice as stored, or a dequantized MXFP4 slice."""
    role = match["proj"].removesuffix("_proj") + ("_bias" if match["suffix"] == "_bias" else "")
    if match["suffix"] != "_blocks":
        shape = tensor.shape[1:]
        return [Piece(role, "whole", "copy", tensor, None, e, tensor.dtype, shape) for e in range(tensor.shape[0])]
    scale = by_name.get(tensor.name.removesuffix("_blocks") + "_scales")
    if scale is None:
        raise StoreError(f"MXFP4 expert tensor {tensor.name} has no _scales companion in the checkpoint")
    experts, rows, groups, half = tensor.shape  # blocks [E, R, G, 16]
    if scale.shape != tensor.shape[:-1] or half * 2 != MXFP4_GROUP:
        raise StoreError(f"MXFP4 {tensor.name} {list(tensor.shape)} does not fit {scale.name} {list(scale.shape)}")
    shape = (groups * 2 * half, rows)  # dequantized [R, G*32], transposed as transformers loads it
    return [Piece(role, "whole", "mxfp4", tensor, scale, e, dtype, shape) for e in range(experts)]


def _blob_tensors(pieces: list[Piece], where: str) -> tuple[list[TensorEntry], list[tuple[Piece, int]]]:
    """Tensor entries (roles in ROLES order, 64-byte aligned) and each piece's offset within the blob."""
    by_role: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_role[piece.role].append(piece)
    _check_roles(by_role, where)
    entries, writes, offset = [], [], 0
    for role in (r for r in ROLES if r in by_role):
        parts = sorted(by_role[role], key=lambda p: PART_ORDER[p.part])
        first = parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
            raise StoreError(f"{where}: the gate and up weights differ in dtype or shape: {[p.source.name for p in parts]}")
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])  # gate_up = cat(gate, up) along rows
        part_offset = offset
        for piece in parts:
            writes.append((piece, part_offset))
            part_offset += piece.nbytes
        entries.append(TensorEntry(role, first.dtype, shape, offset, part_offset - offset))
        offset = _align(part_offset, TENSOR_ALIGN)
    return entries, writes


def _check_roles(by_role: dict[str, list[Piece]], where: str) -> None:
    """StoreError unless the blob has gate_up (whole, or gate + up) and down, and both biases or neither."""
    missing = [role for role in ("gate_up", "down") if role not in by_role]
    if missing:
        raise StoreError(f"{where}: the checkpoint has no {' or '.join(missing)} weights for this expert")
    parts = sorted(p.part for p in by_role["gate_up"])
    if parts not in (["whole"], ["gate", "up"]) or len(by_role["down"]) != 1:
        names = [p.source.name for ps in by_role.values() for p in ps]
        raise StoreError(f"{where}: incomplete or duplicated expert weights {names}")
    if ("gate_up_bias" in by_role) != ("down_bias" in by_role):
        raise StoreError(f"{where}: the checkpoint has one expert bias without the other")


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _data_file_name(precision: str, layer: int) -> str:
    return f"experts-{precision}-L{layer:05d}.bin"


def make_plan(config: dict[str, Any], tensors: list[SourceTensor], precisions: tuple[str, ...]) -> Plan:
    """Classify every checkpoint tensor (expert piece, scale, resident, skipped) and lay out every blob.

    StoreError for unknown expert tensors, incomplete experts, or MoE layers with missing experts.
    """
    num_layers = _text_config(config)["num_hidden_layers"]
    by_name = {t.name: t for t in tensors}
    dtype, fp8_block = _compute_dtype(config), _fp8_block(config)
    pieces: dict[tuple[int, int], list[Piece]] = defaultdict(list)
    resident, consumed, skipped = [], set(), []
    for tensor in tensors:
        layer = LAYER_OF_TENSOR.search(tensor.name)
        if layer and int(layer[1]) >= num_layers:
            skipped.append(tensor)
            continue
        uses = _expert_pieces(tensor, by_name, dtype, fp8_block)
        if uses is None:
            resident.append(tensor)
        elif not uses:
            consumed.add(tensor.name)
        for layer_index, expert, piece in uses or ():
            pieces[layer_index, expert].append(piece)
    decodes = sorted({p.decode for ps in pieces.values() for p in ps} - {"copy"})
    blobs = [blob for precision in precisions for blob in _layout(pieces, precision)]
    return Plan(
        blobs=blobs, resident=resident, consumed=consumed, skipped=skipped,
        quantization="+".join(decodes) or None, transposed=_transposed(blobs[0]) if blobs else False,
    )


def _transposed(blob: PlannedBlob) -> bool:
    """Whether experts are stored [in, out] (gpt_oss: gate_up [H, 2I], down [I, H]) rather than [out, in]
    (gate_up [2I, H], down [H, I]); the two cannot both fit one pair of shapes. StoreError when neither does.
    """
    gate_up, down = (t.shape for t in blob.tensors[:2])
    if len(gate_up) == 2 and len(down) == 2:
        if gate_up == (2 * down[1], down[0]):
            return False
        if gate_up == (down[1], 2 * down[0]):
            return True
    raise StoreError(f"layer {blob.layer}, expert {blob.expert}: gate_up {gate_up} and down {down} do not fit together")


def _layout(pieces: dict[tuple[int, int], list[Piece]], precision: str) -> Iterator[PlannedBlob]:
    """Blobs of one precision: per MoE layer one data file, experts 0..E-1 back to back at 4 KiB multiples."""
    experts_of: dict[int, list[int]] = defaultdict(list)
    for layer, expert in pieces:
        experts_of[layer].append(expert)
    for layer in sorted(experts_of):
        experts = sorted(experts_of[layer])
        if experts != list(range(len(experts))):
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            raise StoreError(f"layer {layer}: the checkpoint lacks experts {missing}")
        offset = 0
        for expert in experts:
            where = f"layer {layer}, expert {expert}"
            entries, writes = _blob_tensors(pieces[layer, expert], where)
            nbytes = entries[-1].offset + entries[-1].nbytes
            padded = _align(nbytes, BLOB_ALIGN)
            yield PlannedBlob(layer, expert, precision, _data_file_name(precision, layer), offset, nbytes, padded,
                              tuple(entries), tuple(writes))
            offset += padded


# ----------------------------------------------------------------------------------------------------- write


def _safetensors_header(tensors: list[SourceTensor]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header for ``tensors`` in order, and each tensor's absolute file offset.

    Layout (the safetensors format): 8-byte little-endian header length, the JSON header padded with spaces to a
    multiple of 8, then the tensors' bytes back to back (``data_offsets`` relative to the end of the header).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, position = {}, 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.code, "shape": list(tensor.shape),
                               "data_offsets": [position, position + tensor.nbytes]}
        offsets[tensor.name] = position
        position += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    return len(encoded).to_bytes(8, "little") + encoded, {name: start + offset for name, offset in offsets.items()}


def _pwrite_tensor(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write ``tensor``'s bytes (made contiguous) at ``offset`` of ``fd``."""
    data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_piece(piece: Piece, handles: dict[Path, Any], fp8_block: tuple[int, int]) -> torch.Tensor:
    """The bytes-to-be of one piece: the stored slice or tensor, or its dequantization (shape ``piece.shape``)."""
    handle = handles[piece.source.shard]
    if piece.decode == "copy":
        if piece.index is None:
            return handle.get_tensor(piece.source.name)
        return handle.get_slice(piece.source.name)[piece.index]
    scale_handle = handles[piece.scale.shard]
    if piece.decode == "fp8":
        weight = handle.get_tensor(piece.source.name)  # [R, C] float8
        return dequantize_fp8_blocks(weight, scale_handle.get_tensor(piece.scale.name), fp8_block, piece.dtype)
    blocks = handle.get_slice(piece.source.name)[piece.index]  # [R, G, 16] uint8
    scales = scale_handle.get_slice(piece.scale.name)[piece.index]  # [R, G] uint8
    return dequantize_mxfp4(blocks, scales, piece.dtype).t()  # [G*32, R]


@contextmanager
def _open_files(out_dir: Path, plan: Plan, resident_size: int) -> Iterator[dict[str, int]]:
    """Create (truncate) and size every data file and the resident file; yield descriptors by file name."""
    sizes: dict[str, int] = defaultdict(int)
    for blob in plan.blobs:
        sizes[blob.file] = max(sizes[blob.file], blob.offset + blob.padded_nbytes)
    sizes[RESIDENT] = resident_size
    fds: dict[str, int] = {}
    try:
        for name, size in sizes.items():
            fds[name] = os.open(out_dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fds[name], size)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_all(model_dir: Path, config: dict[str, Any], plan: Plan, tensors: list[SourceTensor],
               fds: dict[str, int], header: bytes, resident_offsets: dict[str, int], progress: bool) -> None:
    """Stream every checkpoint tensor once, in checkpoint order, to its place(s); then fsync every file."""
    os.pwrite(fds[RESIDENT], header, 0)
    destinations: dict[str, list[tuple[Piece, str, int]]] = defaultdict(list)
    for blob in plan.blobs:
        for piece, offset in blob.writes:
            destinations[piece.source.name].append((piece, blob.file, blob.offset + offset))
    fp8_block = _fp8_block(config)
    with ExitStack() as stack:
        handles = {shard: stack.enter_context(safe_open(shard, framework="pt")) for shard in {t.shard for t in tensors}}
        for tensor in tqdm(tensors, desc=f"prepare {model_dir.name}", unit="tensor", disable=None if progress else True):
            if tensor.name in resident_offsets:
                _pwrite_tensor(fds[RESIDENT], handles[tensor.shard].get_tensor(tensor.name), resident_offsets[tensor.name])
            for piece, file, offset in destinations.get(tensor.name, ()):
                _pwrite_tensor(fds[file], _read_piece(piece, handles, fp8_block), offset)
    for fd in fds.values():
        os.fsync(fd)


def _checksums(out_dir: Path, plan: Plan, fds: dict[str, int]) -> list[int]:
    """crc32 of every blob's unpadded bytes, read back from disk through one reused buffer, in plan order.

    The files' pages are dropped from the page cache afterwards (they are on disk; nobody reads them soon).
    """
    buffer = bytearray(max((b.nbytes for b in plan.blobs), default=0))
    view = memoryview(buffer)
    checksums = []
    for blob in plan.blobs:
        got = os.preadv(fds[blob.file], [view[: blob.nbytes]], blob.offset)
        if got != blob.nbytes:
            raise StoreError(f"short read-back of {out_dir / blob.file} at {blob.offset}: {got} of {blob.nbytes} bytes")
        checksums.append(zlib.crc32(view[: blob.nbytes]))
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return checksums


def _manifest(config: dict[str, Any], source: dict[str, Any], plan: Plan, checksums: list[int],
              precisions: tuple[str, ...], resident_size: int) -> dict[str, Any]:
    """The manifest document (see the module docstring for its keys)."""
    num_experts: dict[int, int] = defaultdict(int)
    files: dict[str, int] = defaultdict(int)
    for blob in plan.blobs:
        num_experts[blob.layer] = max(num_experts[blob.layer], blob.expert + 1)
        files[blob.file] = max(files[blob.file], blob.offset + blob.padded_nbytes)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": _fingerprint_of(source),
        "source": source,
        "model_type": config.get("model_type"),
        "num_layers": _text_config(config)["num_hidden_layers"],
        "moe_layers": sorted(num_experts),
        "num_experts": {str(layer): count for layer, count in sorted(num_experts.items())},
        "precisions": list(precisions),
        "source_quantization": plan.quantization,
        "transposed": plan.transposed,
        "alignment": {"blob": BLOB_ALIGN, "tensor": TENSOR_ALIGN},
        "checksum": "crc32",
        "files": [{"name": name, "nbytes": size} for name, size in sorted(files.items())],
        "resident": {"file": RESIDENT, "nbytes": resident_size, "num_tensors": len(plan.resident)},
        "blobs": [_blob_record(blob, checksum) for blob, checksum in zip(plan.blobs, checksums)],
    }


def _blob_record(blob: PlannedBlob, checksum: int) -> dict[str, Any]:
    tensors = [{"role": t.role, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "offset": t.offset,
                "nbytes": t.nbytes} for t in blob.tensors]
    return {"layer": blob.layer, "expert": blob.expert, "precision": blob.precision, "file": blob.file,
            "offset": blob.offset, "nbytes": blob.nbytes, "padded_nbytes": blob.padded_nbytes,
            "checksum": checksum, "tensors": tensors}


def _write_manifest_atomically(out_dir: Path, manifest: dict[str, Any]) -> None:
    """manifest.json via a temp file, fsync, rename and a directory fsync: it exists whole or not at all."""
    temporary = out_dir / f"{MANIFEST}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(manifest, file, separators=(",", ":"))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, out_dir / MANIFEST)
    _fsync_dir(out_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------- prepare


def _is_store_file(name: str) -> bool:
    return name in (MANIFEST, f"{MANIFEST}.tmp", RESIDENT, LOCK) or bool(DATA_FILE_PATTERN.fullmatch(name))


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir/prepare.lock``: one prepare per store directory at a time."""
    with open(out_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reusable(out_dir: Path, expected: str, precisions: tuple[str, ...]) -> ExpertStore | None:
    """The complete store in ``out_dir`` when its fingerprint is ``expected`` and it has every precision; else
    None (with a log line saying why a store that is there will be rebuilt).
    """
    if not (out_dir / MANIFEST).exists():
        return None
    try:
        store = ExpertStore.open(out_dir)
    except StoreError as exc:
        logger.info("rebuilding the expert store in %s: %s", out_dir, exc)
        return None
    if store.fingerprint != expected:
        logger.info("rebuilding the expert store in %s: the checkpoint changed (fingerprint %s, store has %s)",
                    out_dir, expected[:16], store.fingerprint[:16])
        return None
    if not set(precisions) <= set(store.precisions):
        logger.info("rebuilding the expert store in %s: it lacks precisions %s", out_dir,
                    sorted(set(precisions) - set(store.precisions)))
        return None
    return store


def _refuse_foreign_files(out_dir: Path) -> None:
    """StoreError when ``out_dir`` holds anything that is not a store file: prepare never deletes user data."""
    foreign = sorted(p.name for p in out_dir.iterdir() if not _is_store_file(p.name))
    if foreign:
        raise StoreError(
            f"{out_dir} is not empty and not an expert store (it holds {', '.join(foreign[:5])}); "
            "give `moeserve prepare` an empty or new directory with --out"
        )


def _clear(out_dir: Path) -> None:
    """Remove a previous store's files, the manifest first (so the directory reads as incomplete at once)."""
    _refuse_foreign_files(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(out_dir)
    for path in out_dir.iterdir():
        if path.name != LOCK:
            path.unlink()


def _check_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    precisions = tuple(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, not {', '.join(unknown) or 'none'}")
    return precisions


def prepare(model_dir: str | Path, out_dir: str | Path, precisions: Iterable[str] = ("native",),
            progress: bool = True) -> ExpertStore:
    """Build (or reuse) the expert store of the checkpoint ``model_dir`` in ``out_dir`` and open it.

    A complete store of the same fingerprint with every requested precision is reused untouched; any other store
    in ``out_dir`` is rebuilt (logged). Memory: a few tensors at a time (per-expert slices of fused stacks),
    never the checkpoint. FileNotFoundError for a directory that is not a checkpoint; ValueError for an unknown
    precision; StoreError for an unsupported checkpoint layout or a non-store ``out_dir``.
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    precisions = _check_precisions(precisions)
    config = _read_config(model_dir)
    source = _source_record(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_files(out_dir)
    with _locked(out_dir):
        store = _reusable(out_dir, _fingerprint_of(source), precisions)
        if store is not None:
            logger.info("reusing the expert store in %s (fingerprint %s)", out_dir, store.fingerprint[:16])
            return store
        _clear(out_dir)
        _build(model_dir, out_dir, config, source, precisions, progress)
    return ExpertStore.open(out_dir)


def _build(model_dir: Path, out_dir: Path, config: dict[str, Any], source: dict[str, Any],
           precisions: tuple[str, ...], progress: bool) -> None:
    """Plan, stream, fsync, checksum, then write the manifest last."""
    tensors = _list_tensors([model_dir / shard["name"] for shard in source["shards"]])
    plan = make_plan(config, tensors, precisions)
    if plan.skipped:
        logger.info("skipping %d tensors of layers beyond num_hidden_layers (transformers does not load them)",
                    len(plan.skipped))
    header, resident_offsets = _safetensors_header(plan.resident)
    resident_size = len(header) + sum(t.nbytes for t in plan.resident)
    logger.info("preparing %d expert blobs (%.2f GB) and %d resident tensors from %s into %s", len(plan.blobs),
                sum(b.padded_nbytes for b in plan.blobs) / 1e9, len(plan.resident), model_dir, out_dir)
    with _open_files(out_dir, plan, resident_size) as fds:
        _write_all(model_dir, config, plan, tensors, fds, header, resident_offsets, progress)
        checksums = _checksums(out_dir, plan, fds)
    _write_manifest_atomically(out_dir, _manifest(config, source, plan, checksums, precisions, resident_size))


def ensure_store(model_dir: str | Path, offload_dir: str | Path) -> ExpertStore:
    """The store of ``model_dir`` under ``offload_dir/<fingerprint[:16]>``: reused when complete and current,
    else (re)built there.
    """
    return prepare(model_dir, Path(offload_dir) / fingerprint(model_dir)[:16], progress=True)
