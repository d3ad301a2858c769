"""Dense projections at RAM speed on the CPU: ``nn.Linear`` layers whose few-row products run on the experts kernel.

Decode multiplies one row per request by every attention, router and LM-head weight. torch's bf16 path for that
(oneDNN) streams those weights well below RAM speed on the machines we measured; the compiled kernel's row paths
(``torch.ops.moeserve.dense``, engine.offload.kernels) run them 1.2-2.1 x faster (benchmarks/dense_linear.py). ``RowStreamLinear`` is an ``nn.Linear`` that sends products of at most ``MAX_ROWS`` rows
on the CPU to the kernel and everything else (prefill, other devices, dtypes the kernel lacks) to ``nn.Linear``;
parameters, names and state dict are ``nn.Linear``'s, so checkpoints load unchanged. Where torch's GEMM loses
at more rows too (bf16 on CPUs without native bf16 arithmetic: on a Zen 3 server 4-6.5 x slower than the kernel
at 16-64 rows, benchmarks/experts_kernel.py), ``calibrate_row_paths`` measures both per weight shape at load and
raises each layer's ``max_rows``.

The layers are swapped in through transformers' own extension point for replacing linear layers at load time, the
quantizer registry (``register_quantizer`` / ``register_quantization_config``): ``RowStreamConfig`` passed to
``from_pretrained`` makes ``RowStreamQuantizer`` replace every ``nn.Linear`` of the model before its weights load.
The weights themselves are not quantized: the arithmetic is the kernel's (weights widened to fp32, fp32
accumulation), accurate to fp32 like the experts forward. The offload loader, which assembles its model itself,
calls ``replace_linears`` directly.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from engine.offload.kernels import KERNEL_DTYPES, best_seconds, kernel_op, load_experts_kernel

logger = logging.getLogger(__name__)

METHOD = "moeserve_row_stream"
MAX_ROWS = 8
"""Rows up to which the kernel runs a product unless calibrated (benchmarks/experts_kernel.py: where torch's GEMM
is fast, as with AMX on Sapphire Rapids, it wins from ~16)."""
CALIBRATION_ROWS = (16, 32, 64)
"""Row counts at which `calibrate_row_paths` times the kernel against ``nn.Linear`` (up to MAX_ROWS the kernel
wins on every machine measured: 1.2-2.1 x at one row)."""


class RowStreamLinear(nn.Linear):
    """``nn.Linear`` whose products of at most ``max_rows`` rows on the CPU run on ``torch.ops.moeserve.dense``."""

    max_rows: int = MAX_ROWS  # per layer once calibrated (calibrate_row_paths)
    _served: weakref.ref | None = None  # the weight last found servable (a weak reference: never keeps it alive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode runs this five times a layer: the parameters read from their dict (not through Module.__getattr__),
        # the weight's side checked once per weight tensor (`_weight_checked`).
        parameters = self._parameters
        weight, bias = parameters["weight"], parameters["bias"]
        if x.numel() <= self.max_rows * self.in_features and _input_served(x) and self._weight_checked(weight):
            return _kernel_product(x, weight, bias)
        return F.linear(x, weight, bias)

    def _weight_checked(self, weight: torch.Tensor) -> bool:
        """Whether the kernel takes this layer's weight (`_weight_served`), checked once per weight tensor."""
        served = self._served
        if served is None or served() is not weight:
            if not _weight_served(weight):
                return False
            self._served = weakref.ref(weight)
        return True


def _input_served(x: torch.Tensor) -> bool:
    """The input's side of what ``torch.ops.moeserve.dense`` takes: on the CPU, a kernel dtype, no autograd."""
    return x.is_cpu and x.dtype in KERNEL_DTYPES and not torch.is_grad_enabled()


def _weight_served(weight: torch.Tensor) -> bool:
    """The weight's side: on the CPU, a kernel dtype, unit inner stride, the kernel built."""
    return (weight.is_cpu and weight.dtype in KERNEL_DTYPES and weight.stride(-1) == 1
            and row_stream_available())


def _kernel_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``torch.ops.moeserve.dense_rows`` (``dense`` allocating its output): [..., out]
    in x's dtype (rounded by the op from its fp32 sums). One op call: a decode layer makes five of these."""
    return kernel_op("dense_rows")(x.contiguous(), weight, bias)


class RowStreamWeight(nn.Parameter):
    """A router's weight whose ``F.linear`` products of at most ``MAX_ROWS`` rows on the CPU run on
    ``torch.ops.moeserve.dense``.

    Routers are not ``nn.Linear`` layers in any supported architecture: transformers' router modules call
    ``F.linear(hidden, self.weight[, self.bias])`` on their own parameter, so `RowStreamLinear` cannot reach them.
    The weight itself can: a tensor subclass decides how torch functions apply to it (``__torch_function__``,
    torch's extension point for tensor types, as quantized parameter types use). Every other function, and a
    product the kernel does not take, runs as on a plain tensor and returns plain tensors. In the engine the
    router's bf16 product on torch (oneDNN) cost 60-100 µs per layer against ~15 µs on the kernel
    (README, the dense projections under "Python API")."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            product = _router_product(*args, **kwargs)
            if product is not None:
                return product
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def streams_on_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` runs on the kernel: ``weight`` a 2-D `RowStreamWeight`, few rows,
    `_input_served`, `_weight_served`, one dtype. Call it with torch-function subclasses disabled
    (``torch._C.DisableTorchFunctionSubclass``): on the subclass every attribute read (dtype, device, stride) would go
    through ``__torch_function__``, ~1.5 us each."""
    if not isinstance(weight, RowStreamWeight) or isinstance(x, RowStreamWeight) or weight.dim() != 2:
        return False
    in_features = weight.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    return (0 < rows <= MAX_ROWS and _input_served(x) and x.dtype == weight.dtype and _weight_served(weight)
            and (bias is None or bias.dtype == weight.dtype))


def _router_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` on the kernel when it takes it (`streams_on_kernel`), else None."""
    with torch._C.DisableTorchFunctionSubclass():  # the checks and the op as on a plain tensor
        return _kernel_product(x, weight, bias) if streams_on_kernel(x, weight, bias) else None


def stream_router_weights(routers: Sequence[nn.Module]) -> int:
    """Give each of ``routers`` (modules with a 2-D ``weight``) a `RowStreamWeight` over the very same data where
    the kernel takes that weight (`_weight_served`); returns how many were swapped."""
    swapped = 0
    for router in routers:
        weight = router.weight
        if isinstance(weight, RowStreamWeight) or weight.dim() != 2 or not _weight_served(weight):
            continue
        router.weight = RowStreamWeight(weight.detach(), requires_grad=False)
        swapped += 1
    return swapped


def replace_linears(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (exactly that class) for a ``RowStreamLinear`` holding the very same
    parameters; return how many. Works on a model on the meta device (before its weights load) as on a loaded one."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            with torch.device("meta"):
                swapped = RowStreamLinear(child.in_features, child.out_features, bias=child.bias is not None)
            swapped.weight = child.weight
            swapped.bias = child.bias
            setattr(module, name, swapped)
            replaced += 1
    return replaced


def kernel_max_rows(seconds: Mapping[int, tuple[float, float]]) -> int:
    """The calibrated ``max_rows`` from (kernel, nn.Linear) seconds per row count above MAX_ROWS: the largest count
    up to which the kernel won at every measured count; unbounded (sys.maxsize) when it won at all of them."""
    best = MAX_ROWS
    for rows in sorted(seconds):
        kernel, linear = seconds[rows]
        if kernel >= linear:
            return best
        best = rows
    return sys.maxsize


def calibrate_row_paths(model: nn.Module, rows: Sequence[int] = CALIBRATION_ROWS,
                        timer: Callable[[RowStreamLinear, int], tuple[float, float]] | None = None) -> dict[tuple, int]:
    """Time the kernel against ``nn.Linear`` at each of ``rows`` for every distinct (out, in, dtype, bias) of the
    model's RowStreamLinear layers the kernel serves, on one such layer's own weight, and set ``max_rows`` on all of
    them (`kernel_max_rows`); returns shape -> max_rows. ``timer(layer, rows)`` -> (kernel s, nn.Linear s) replaces
    the measurement (tests)."""
    timer = timer or _time_row_paths
    layers: dict[tuple, list[RowStreamLinear]] = {}
    for module in model.modules():
        if isinstance(module, RowStreamLinear):
            key = (module.out_features, module.in_features, module.weight.dtype, module.bias is not None)
            layers.setdefault(key, []).append(module)
    chosen: dict[tuple, int] = {}
    for key, group in layers.items():
        probe = torch.zeros(1, group[0].in_features, dtype=group[0].weight.dtype)
        with torch.no_grad():
            if not (_input_served(probe) and group[0]._weight_checked(group[0].weight)):
                continue
        chosen[key] = kernel_max_rows({r: timer(group[0], r) for r in rows})
        for layer in group:
            layer.max_rows = chosen[key]
    return chosen


@torch.no_grad()
def _time_row_paths(layer: RowStreamLinear, rows: int) -> tuple[float, float]:
    """Best of 3 seconds of ``layer``'s product over ``rows`` rows on the kernel and on ``nn.Linear``."""
    x = torch.randn(rows, layer.in_features).to(layer.weight.dtype)  # [rows, in]

    def kernel() -> None:
        _kernel_product(x, layer.weight, layer.bias)  # the call the forward makes (allocating, as F.linear does)

    def linear() -> None:
        F.linear(x, layer.weight, layer.bias)

    return best_seconds(kernel), best_seconds(linear)


def row_stream_available() -> bool:
    """True when the kernel that RowStreamLinear needs is built and loads on this CPU."""
    return load_experts_kernel() is not None


@register_quantization_config(METHOD)
class RowStreamConfig(QuantizationConfigMixin):
    """The ``quantization_config`` that asks ``from_pretrained`` for RowStreamLinear layers (weights unchanged)."""

    def __init__(self, **kwargs) -> None:
        self.quant_method = METHOD


@register_quantizer(METHOD)
class RowStreamQuantizer(HfQuantizer):
    """Replaces the model's ``nn.Linear`` layers with ``RowStreamLinear`` before the weights load; quantizes nothing."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        if not row_stream_available():
            raise RuntimeError("RowStreamLinear needs the compiled experts kernel (python -m engine.offload.kernels.build)")

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        logger.debug("row-stream linears: %d layers", replace_linears(model))

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False
