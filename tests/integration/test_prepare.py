"""`moeserve prepare` and the expert store on real checkpoints: every demo architecture, bit for bit against the
experts transformers loads; resident weights; reuse and rebuild; corruption, truncation and crashes; quantized
checkpoints quantized here; bounded memory on a multi-GB checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.demo import ARCHITECTURES, DemoModelSpec, write_demo_model
from engine.offload.layout import (
    BLOB_ALIGN, MANIFEST, TENSOR_ALIGN, BlobEntry, ExpertStore, StoreError, ensure_store, fingerprint,
    prepare,
)
from engine.offload.quant import FP4_VALUES
from server.cli import EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[2]
EXPERT_NAME_PARTS = (".experts.",)  # routed experts; shared_expert(s) and dense MLPs are resident


def read_blob(entry: BlobEntry) -> torch.Tensor:
    """The blob's padded bytes, read from its data file into a fresh (64-byte aligned) uint8 slot."""
    buffer = torch.empty(entry.padded_nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as file:
        assert os.preadv(file.fileno(), [buffer.numpy()], entry.offset) == entry.padded_nbytes
    return buffer


def load_experts_modules(model_dir: Path) -> dict[int, torch.nn.Module]:
    """transformers' fused experts modules of ``model_dir``, by layer (stock loading, the checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return {index: layer.mlp.experts for index, layer in enumerate(model.model.layers)
            if hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_expert_blob_equals_the_loaded_transformers_experts(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model(arch)
    store = prepare(model_dir, tmp_path / "store", progress=False)
    modules = load_experts_modules(model_dir)
    assert store.moe_layers == tuple(sorted(modules))
    assert store.model_type == arch and store.num_layers == 4
    for layer, experts in modules.items():
        assert store.num_experts[layer] == experts.num_experts
        for expert in range(experts.num_experts):
            entry = store.blob(layer, expert)
            assert entry.offset % BLOB_ALIGN == 0 and entry.padded_nbytes % BLOB_ALIGN == 0
            assert entry.nbytes <= entry.padded_nbytes < entry.nbytes + BLOB_ALIGN
            assert all(t.offset % TENSOR_ALIGN == 0 for t in entry.tensors)
            buffer = read_blob(entry)
            store.verify(entry, buffer)
            views = store.view(entry, buffer)
            expected = {"gate_up": experts.gate_up_proj[expert], "down": experts.down_proj[expert]}
            if experts.has_bias:
                expected |= {"gate_up_bias": experts.gate_up_proj_bias[expert],
                             "down_bias": experts.down_proj_bias[expert]}
            assert [t.role for t in entry.tensors] == list(expected)
            for role, tensor in expected.items():
                assert views[role].dtype == tensor.dtype and torch.equal(views[role], tensor), (layer, expert, role)
                assert views[role].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resident_file_holds_every_other_tensor_verbatim(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model(arch)
    store = prepare(model_dir, tmp_path / "store", progress=False)
    source = load_file(model_dir / "model.safetensors")
    resident = load_file(store.resident_path)
    expected = {name for name in source if not any(part in name for part in EXPERT_NAME_PARTS)}
    assert set(resident) == expected
    for name in expected:
        assert resident[name].dtype == source[name].dtype and torch.equal(resident[name], source[name]), name
    if arch.startswith("deepseek"):
        assert 0 not in store.moe_layers and "model.layers.0.mlp.gate_proj.weight" in resident
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in resident
    if arch == "qwen2_moe":
        assert "model.layers.1.mlp.shared_expert.up_proj.weight" in resident


def test_manifest_records_the_format(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = demo_model("gpt_oss")
    store = prepare(model_dir, tmp_path / "store", progress=False)
    manifest = json.loads((store.root / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["fingerprint"] == fingerprint(model_dir)
    assert manifest["source"]["shards"] == [
        {"name": "model.safetensors", "size": (model_dir / "model.safetensors").stat().st_size,
         "mtime_ns": (model_dir / "model.safetensors").stat().st_mtime_ns}
    ]
    assert manifest["transposed"] is True and manifest["source_quantization"] is None
    blob = manifest["blobs"][0]
    assert set(blob) == {"layer", "expert", "precision", "file", "offset", "nbytes", "padded_nbytes", "checksum",
                         "tensors"}
    assert blob["tensors"][0] == {"role": "gate_up", "dtype": "float32", "shape": [64, 128], "offset": 0,
                                  "nbytes": 64 * 128 * 4}
    # The manifest is the last file written, and no temporary file is left behind.
    data_files = [store.root / f["name"] for f in manifest["files"]] + [store.resident_path]
    assert all(path.stat().st_mtime_ns <= (store.root / MANIFEST).stat().st_mtime_ns for path in data_files)
    assert sorted(p.name for p in store.root.iterdir() if p.suffix == ".tmp") == []
    assert store.max_blob_bytes == max(b["padded_nbytes"] for b in manifest["blobs"])
    assert store.total_expert_bytes == sum(b["padded_nbytes"] for b in manifest["blobs"])


def test_a_complete_current_store_is_reused_and_a_stale_one_rebuilt(
    demo_model: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "model"
    write_demo_model(model_dir, DemoModelSpec(arch="qwen3_moe", seed=1))
    store = prepare(model_dir, tmp_path / "store", progress=False)
    files = sorted(store.root.iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = prepare(model_dir, tmp_path / "store", progress=False)
    assert again.fingerprint == store.fingerprint
    assert [p.stat().st_mtime_ns for p in sorted(store.root.iterdir())] == mtimes, "a current store is not rewritten"

    shard = model_dir / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match="different checkpoint") as error:
        ExpertStore.open(store.root, model_dir)
    assert "moeserve prepare" in str(error.value)
    with caplog.at_level(logging.INFO, logger="engine.offload.layout"):
        rebuilt = prepare(model_dir, tmp_path / "store", progress=False)
    assert rebuilt.fingerprint == fingerprint(model_dir) != store.fingerprint
    assert any("rebuilding" in record.getMessage() for record in caplog.records)
    assert (store.root / MANIFEST).stat().st_mtime_ns > mtimes[[p.name for p in files].index(MANIFEST)]
    ExpertStore.open(store.root, model_dir)


def test_ensure_store_keys_the_store_by_fingerprint(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = demo_model("olmoe")
    store = ensure_store(model_dir, tmp_path / "offload")
    assert store.root == (tmp_path / "offload" / fingerprint(model_dir)[:16]).resolve()
    manifest_mtime = (store.root / MANIFEST).stat().st_mtime_ns
    assert ensure_store(model_dir, tmp_path / "offload").root == store.root
    assert (store.root / MANIFEST).stat().st_mtime_ns == manifest_mtime


def test_missing_or_incomplete_store_tells_how_to_prepare(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"manifest.json is missing.*moeserve prepare MODEL --out"):
        ExpertStore.open(tmp_path / "nowhere")
    store = prepare(demo_model("mixtral"), tmp_path / "store", progress=False)
    (store.root / MANIFEST).unlink()
    with pytest.raises(StoreError, match=r"no complete expert store.*moeserve prepare"):
        ExpertStore.open(store.root)


def test_a_flipped_byte_fails_verification_naming_file_layer_and_expert(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = prepare(demo_model("deepseek_v2"), tmp_path / "store", progress=False)
    entry = store.blob(2, 5)
    store.verify(entry, read_blob(entry))
    with open(entry.file, "r+b") as file:
        position = entry.offset + entry.tensors[1].offset + 7
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0x10]))
    reopened = ExpertStore.open(store.root)  # sizes are intact: only the checksum can tell
    with pytest.raises(StoreError) as error:
        reopened.verify(entry, read_blob(entry))
    message = str(error.value)
    assert str(entry.file) in message and "layer 2" in message and "expert 5" in message
    reopened.verify(store.blob(2, 4), read_blob(store.blob(2, 4)))


def test_a_truncated_data_file_is_refused_at_open_naming_it(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    store = prepare(demo_model("qwen2_moe"), tmp_path / "store", progress=False)
    entry = store.blob(3, 7)
    os.truncate(entry.file, entry.offset + 100)
    with pytest.raises(StoreError, match="truncated") as error:
        ExpertStore.open(store.root)
    assert str(entry.file) in str(error.value) and "moeserve prepare" in str(error.value)


def test_prepare_refuses_a_directory_of_other_files(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("user data")
    with pytest.raises(StoreError, match="not an expert store"):
        prepare(demo_model("mixtral"), tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "user data"


def test_cli_prepare_writes_the_store_and_prints_its_path(
    demo_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = demo_model("mixtral")
    assert main(["prepare", str(model_dir), "--out", str(tmp_path / "store"), "--precisions", "native"]) == 0
    assert capsys.readouterr().out == f"{(tmp_path / 'store').resolve()}\n"
    ExpertStore.open(tmp_path / "store", model_dir)
    assert main(["prepare", str(model_dir), "--out", str(tmp_path / "other"), "--precisions", "int3"]) == EXIT_USAGE
    assert "precisions must be among native" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == EXIT_USAGE
    assert "not a Hugging Face model directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- quantized checkpoints


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows [R, C] (C a multiple of 32) -> MXFP4 blocks [R, C/32, 16], scales [R, C/32] (both uint8) and the
    exact values they encode [R, C] float32: per group of 32, a power-of-two scale putting the largest magnitude
    in [4, 8), each value rounded to the nearest e2m1 value (clamped at 6).
    """
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=2.0**-100)
    exponent = torch.floor(torch.log2(amax)) - 2  # [R, G]
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    grid = torch.tensor(FP4_VALUES[:8])
    magnitude_code = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)  # [R, G, 32]
    codes = magnitude_code + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    values = torch.tensor(FP4_VALUES)[codes] * torch.exp2(exponent).unsqueeze(-1)
    return blocks, (exponent + 127).to(torch.uint8), values.reshape(rows, cols)


def quantize_fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R, C] -> float8_e4m3fn weight, float32 scale_inv [ceil(R/b), ceil(C/b)] and the exact dequantized float32."""
    rows, cols = weight.shape
    scale_inv = torch.empty(-(-rows // block), -(-cols // block))
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale_inv[i, j] = tile.float().abs().amax().clamp(min=1e-12) / 448.0
    expanded = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    quantized = (weight.float() / expanded).to(torch.float8_e4m3fn)
    return quantized, scale_inv, quantized.float() * expanded


def rewrite_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor], quantization: dict) -> None:
    """Replace the checkpoint's tensors and add ``quantization_config`` to its config, as hub checkpoints ship."""
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.slow
def test_gpt_oss_mxfp4_experts_are_dequantized_to_bfloat16(tmp_path: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model_dir = write_demo_model(tmp_path / "model", DemoModelSpec(arch="gpt_oss", dtype="bfloat16"))
    tensors = load_file(model_dir / "model.safetensors")
    expected: dict[tuple[int, str], torch.Tensor] = {}
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            stack = tensors.pop(prefix + proj).transpose(1, 2)  # module [E, in, out] -> hub rows [E, out, in]
            quantized = [quantize_mxfp4(stack[e]) for e in range(stack.shape[0])]
            tensors[prefix + proj + "_blocks"] = torch.stack([q[0] for q in quantized])
            tensors[prefix + proj + "_scales"] = torch.stack([q[1] for q in quantized])
            expected[layer, proj] = torch.stack([q[2] for q in quantized]).transpose(1, 2)  # [E, in, out]
            reference = convert_moe_packed_tensors(tensors[prefix + proj + "_blocks"],
                                                   tensors[prefix + proj + "_scales"], dtype=torch.bfloat16)
            assert torch.equal(reference.float(), expected[layer, proj]), "the test's quantizer matches transformers"
            original = stack.transpose(1, 2).float()
            assert (expected[layer, proj] - original).abs().max() <= original.abs().max() / 3
    rewrite_checkpoint(model_dir, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})

    store = prepare(model_dir, tmp_path / "store", progress=False)
    assert store.source_quantization == "mxfp4" and store.transposed
    for layer in range(4):
        for expert in range(8):
            entry = store.blob(layer, expert)
            views = store.view(entry, read_blob(entry))
            assert views["gate_up"].dtype == torch.bfloat16 and views["gate_up"].shape == (64, 128)
            assert torch.equal(views["gate_up"].float(), expected[layer, "gate_up_proj"][expert])
            assert torch.equal(views["down"].float(), expected[layer, "down_proj"][expert])
            bias = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj_bias"][expert]
            assert torch.equal(views["gate_up_bias"], bias)
    assert not any("_blocks" in name or "_scales" in name for name in load_file(store.resident_path))


@pytest.mark.slow
def test_deepseek_v3_fp8_experts_are_dequantized_and_other_fp8_weights_stay_verbatim(tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    model_dir = write_demo_model(tmp_path / "model", DemoModelSpec(arch="deepseek_v3", dtype="bfloat16"))
    block = 16
    tensors = load_file(model_dir / "model.safetensors")
    originals = dict(tensors)
    expected: dict[str, torch.Tensor] = {}
    for name in [n for n in tensors if n.endswith("_proj.weight") and ("experts." in n)]:
        quantized, scale_inv, values = quantize_fp8_blocks(tensors[name], block)
        tensors[name], tensors[name + "_scale_inv"] = quantized, scale_inv
        expected[name] = values.to(torch.bfloat16)
        reference = Fp8Dequantize(None)._dequantize_one(quantized, scale_inv, output_dtype=torch.bfloat16)
        assert torch.equal(reference, expected[name]), "the test's quantizer matches transformers"
        torch.testing.assert_close(expected[name].float(), originals[name].float(), rtol=0.07, atol=1e-6)
    rewrite_checkpoint(model_dir, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [block, block]})

    store = prepare(model_dir, tmp_path / "store", progress=False)
    assert store.source_quantization == "fp8" and not store.transposed
    for layer in (1, 2, 3):
        for expert in range(16):
            entry = store.blob(layer, expert)
            views = store.view(entry, read_blob(entry))
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            gate_up = torch.cat([expected[prefix + "gate_proj.weight"], expected[prefix + "up_proj.weight"]])
            assert views["gate_up"].dtype == torch.bfloat16 and torch.equal(views["gate_up"], gate_up)
            assert torch.equal(views["down"], expected[prefix + "down_proj.weight"])
    resident = load_file(store.resident_path)
    shared = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    assert resident[shared].dtype == torch.float8_e4m3fn and torch.equal(resident[shared].float(),
                                                                           tensors[shared].float())
    assert torch.equal(resident[shared + "_scale_inv"], tensors[shared + "_scale_inv"])
    assert not any(".experts." in name for name in resident)


# --------------------------------------------------------------------------------------------- large checkpoints

# A Mixtral-shaped checkpoint (Mixtral's hidden/intermediate ratio at hidden 1024), generated without a model.
BIG_HIDDEN, BIG_INTERMEDIATE, BIG_EXPERTS, BIG_VOCAB = 1024, 3584, 8, 1024
MIB = 1 << 20


def write_big_mixtral(model_dir: Path, num_layers: int) -> int:
    """Write a bf16 Mixtral checkpoint of ``num_layers`` layers tensor by tensor (constant tensors, written straight
    into one safetensors file); return the largest tensor's bytes.
    """
    model_dir.mkdir(parents=True)
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": BIG_HIDDEN,
        "intermediate_size": BIG_INTERMEDIATE, "num_hidden_layers": num_layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "num_local_experts": BIG_EXPERTS, "num_experts_per_tok": 2,
        "vocab_size": BIG_VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (BIG_VOCAB, BIG_HIDDEN), "model.norm.weight": (BIG_HIDDEN,),
              "lm_head.weight": (BIG_VOCAB, BIG_HIDDEN)}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        shapes |= {prefix + "input_layernorm.weight": (BIG_HIDDEN,),
                   prefix + "post_attention_layernorm.weight": (BIG_HIDDEN,),
                   prefix + "self_attn.q_proj.weight": (BIG_HIDDEN, BIG_HIDDEN),
                   prefix + "self_attn.k_proj.weight": (256, BIG_HIDDEN),
                   prefix + "self_attn.v_proj.weight": (256, BIG_HIDDEN),
                   prefix + "self_attn.o_proj.weight": (BIG_HIDDEN, BIG_HIDDEN),
                   prefix + "block_sparse_moe.gate.weight": (BIG_EXPERTS, BIG_HIDDEN)}
        for expert in range(BIG_EXPERTS):
            moe = f"{prefix}block_sparse_moe.experts.{expert}."
            shapes |= {moe + "w1.weight": (BIG_INTERMEDIATE, BIG_HIDDEN), moe + "w3.weight": (BIG_INTERMEDIATE, BIG_HIDDEN),
                       moe + "w2.weight": (BIG_HIDDEN, BIG_INTERMEDIATE)}
    header, position = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(model_dir / "model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for index, shape in enumerate(shapes.values()):
            file.write(torch.full(shape, float(index % 251) / 64, dtype=torch.bfloat16).view(torch.uint8).numpy())
    return max(2 * torch.Size(shape).numel() for shape in shapes.values())


def run_prepare_sampling_rss(model_dir: Path, out_dir: Path, kill_when: Callable[[], bool] | None = None) -> tuple[int, int]:
    """Run prepare in a child process, sampling its RssAnon every millisecond; return (exit code, peak bytes).

    With ``kill_when``, the child is killed (SIGKILL, a crash) as soon as ``kill_when()`` holds.
    """
    code = "import sys; from engine.offload.layout import prepare; prepare(sys.argv[1], sys.argv[2], progress=False)"
    child = subprocess.Popen([sys.executable, "-c", code, str(model_dir), str(out_dir)], cwd=ROOT)
    peak = 0
    try:
        while child.poll() is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                break
            rss_anon = next((line for line in status.splitlines() if line.startswith("RssAnon:")), None)
            if rss_anon:
                peak = max(peak, int(rss_anon.split()[1]) * 1024)
            if kill_when is not None and kill_when():
                os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.001)
        return child.wait(), peak
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.slow
def test_prepare_memory_stays_bounded_on_a_checkpoint_four_times_the_bound(tmp_path: Path) -> None:
    num_layers = 13
    largest = write_big_mixtral(tmp_path / "model", num_layers)
    bound = 2 * largest + 512 * MIB
    expert_bytes = num_layers * BIG_EXPERTS * 3 * BIG_HIDDEN * BIG_INTERMEDIATE * 2
    assert expert_bytes >= 4 * bound
    try:
        returncode, peak = run_prepare_sampling_rss(tmp_path / "model", tmp_path / "store")
        assert returncode == 0
        logging.getLogger(__name__).info("prepare RssAnon peak %.0f MiB, bound %.0f MiB, experts %.0f MiB",
                                         peak / MIB, bound / MIB, expert_bytes / MIB)
        assert 0 < peak <= bound, f"RssAnon peak {peak / MIB:.0f} MiB exceeds {bound / MIB:.0f} MiB"
        store = ExpertStore.open(tmp_path / "store", tmp_path / "model")
        assert store.moe_layers == tuple(range(num_layers)) and len(store.blobs()) == num_layers * BIG_EXPERTS
        entry = store.blob(num_layers - 1, BIG_EXPERTS - 1)
        buffer = read_blob(entry)
        store.verify(entry, buffer)
        gate_up = store.view(entry, buffer)["gate_up"]
        assert gate_up.shape == (2 * BIG_INTERMEDIATE, BIG_HIDDEN) and gate_up[0, 0] != gate_up[-1, -1]
    finally:
        for path in (tmp_path / "store", tmp_path / "model"):
            for file in path.glob("*"):
                file.unlink()


@pytest.mark.slow
def test_a_crash_mid_prepare_leaves_an_incomplete_store_that_prepare_completes(tmp_path: Path) -> None:
    write_big_mixtral(tmp_path / "model", num_layers=2)
    store_dir = tmp_path / "store"
    try:
        returncode, _ = run_prepare_sampling_rss(
            tmp_path / "model", store_dir, kill_when=lambda: any(store_dir.glob("experts-*.bin"))
        )
        assert returncode == -signal.SIGKILL
        assert not (store_dir / MANIFEST).exists() and any(store_dir.glob("experts-*.bin"))
        with pytest.raises(StoreError, match="manifest.json is missing"):
            ExpertStore.open(store_dir)
        store = prepare(tmp_path / "model", store_dir, progress=False)
        entry = store.blob(1, 7)
        store.verify(entry, read_blob(entry))
    finally:
        for path in (store_dir, tmp_path / "model"):
            for file in path.glob("*"):
                file.unlink()
