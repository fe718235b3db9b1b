"""Learned weight rounding: AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"; AIMET's `Adaround` does the same).

Nearest rounding minimizes each weight's own error, not the layer's output error: errors that cancel on
the layer's (correlated) inputs are better than small ones that add up. AdaRound learns, per weight, whether
to round up or down: the soft weight s * clamp(floor(W/s) + h(V), qmin, qmax), with the rectified sigmoid
h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) (zeta = 1.1, gamma = -0.1) and V initialised so that
h(V) is the fractional part of W/s, minimizes

    mean over positions of the squared output error summed over output channels
    + lambda * sum over weights of (1 - |2 h(V) - 1| ** beta)

with Adam; the regularizer (lambda = 0.01) is off for the first 20% of the iterations, then beta decays from
20 to 2 on a cosine (AIMET's schedule), which pushes every h(V) to 0 or 1. The result rounds up where
h(V) >= 0.5, so each integer differs from nearest rounding by at most one step.

A conv or linear output is linear in its weight, so the output error of soft weights W~ is that of the
weight change W~ - W alone, a quadratic form in it over the input patches' second moments (`_InputMoments`):
computed once per layer through the module's own forward (`torch.func.functional_call`, so a TF-'same' conv
that pads in its forward is handled), it makes every step exact over all captured inputs and independent of
their number and size. The reference implementations instead run the layer forward and backward on a
mini-batch of 32 samples at each of 10,000 steps at Adam's learning rate 1e-3: too slow on a CPU (a 3x3
depthwise conv on 16 samples of 32 x 112 x 112 took 0.27 s per step here, under load). With exact steps, 1,000 at 1e-2
came within a few percent of 3,000 (at 1e-2 or 1e-3) on small 4- and 7-bit convs.
The same linearity resolves BatchNorm folding: prepare_fx quantizes BN-folded weights, which a StaticBuilder's
FP32 model does not have (it keeps conv and BN apart). Folding scales each output channel, so the folded layer
is the FP32 conv module run with the folded weight and bias; `adarounded` therefore captures the layer's inputs
in the FP32 model and optimizes the weights given (`float_weights` of the prepared graph) through that module.

The flow for a StaticBuilder (plans of the same weight granularity and bits share its result):

    weights = float_weights(builder.prepared(), builder.layers)
    scales = weight_scales(weights, plan.weight_granularity,
                           lambda name: plan.layer_weight_bits.get(name, plan.weight_bits))
    rounded = adarounded(fp32_model, list(weights), batches, scales, weights=weights)
    set_int8_weights(builder.build(plan), rounded, engine=plan.engine, layer_engines=plan.layer_engines)

Cost per layer at the defaults (2 cores, shared with other jobs): MobileNetV2's largest 3x3 depthwise conv
(32 x 112 x 112 inputs, 32 samples) takes about 2 s (1.6 s on 2 threads, 1.9 s on 1; 6 s when other jobs held
the cores), 1 s of it the moments, which grow with the samples. Where K is large the steps dominate (K * K per
output channel, or positions * K, plus the regularizer over every weight): about 23 ms per step for its last
1x1 conv (320 -> 1280) and 50 ms for a 1280 -> 1000 classifier on 32 samples (one thread, from 100 steps),
so 25 to 50 s per such layer. Memory: the layer's captured inputs, plus K * K per group.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.func import functional_call

from autoq.calibrate.observers import weight_observer
from autoq.recover.bias import FloatWeights, eval_copy, float_layer, repack, static_int8_layers
from autoq.recover.equalize import scales_with_weight

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so that h(V) reaches 0 and 1 exactly
REGULARIZATION = 0.01  # lambda: weight of the rounding regularizer against the output error
BETA_START, BETA_END = 20.0, 2.0  # annealing of the regularizer's exponent
WARM_UP = 0.2  # fraction of the iterations without the regularizer
ITERATIONS, LEARNING_RATE = 1000, 1e-2  # Adam steps on V
SAMPLES = 128  # calibration samples whose inputs a layer is rounded on
PATCH_BUDGET = 1 << 24  # input patch elements (float32) computed at once: 64 MB
INT8_MIN, INT8_MAX = -128, 127
Scales = Mapping[str, tuple[torch.Tensor, int, int]]  # layer name -> (scale, quant_min, quant_max)


def weight_scales(weights: FloatWeights, granularity: str,
                  bits_of: Callable[[str], int]) -> dict[str, tuple[torch.Tensor, int, int]]:
    """{layer name: (scale, quant_min, quant_max)} of each weight as convert_fx quantizes it for a plan.

    weights: FP32 (W, b) by layer name (`float_weights` on the prepared graph: BN folded); granularity: the
    plan's weight_granularity ('per_channel': scales of shape [outputs]; 'per_tensor': one); bits_of:
    the plan's weight bits of a layer (8: [-128, 127], 7: [-63, 63]). The scales come from the same observer
    the plan's qconfig puts on each weight (`weight_observer`), so they are the converted model's.
    """
    scales = {}
    for name, (weight, _) in weights.items():
        observer = weight_observer(granularity, bits_of(name))()
        observer(weight)
        scale, _ = observer.calculate_qparams()
        scales[name] = (scale, observer.quant_min, observer.quant_max)
    return scales


def adaround_layer(layer: nn.Module, inputs: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int, *,
                   weight: torch.Tensor | None = None, iterations: int = ITERATIONS,
                   learning_rate: float = LEARNING_RATE) -> torch.Tensor:
    """Learned int8 weights (dtype int8, the shape of `layer.weight`) for a conv or linear layer.

    layer: nn.Conv1d/2d/3d (grouped and depthwise too) or nn.Linear, or a subclass whose forward is linear in
    its weight and bias (such as a conv that pads first); it is run, never changed. inputs: the layer's FP32
    inputs, samples along axis 0. scale: symmetric weight scale per output channel (shape [outputs]) or per
    tensor (one element); the zero point is 0. quant_min, quant_max: the integer range, within [-128, 127].
    weight: the FP32 weight to round (default: the layer's own; a BN-folded weight of the same shape is run
    through the layer's forward, see the module doc). iterations: Adam steps on V, at `learning_rate`.
    The output error is exact over all of `inputs` at every step (see `_InputMoments`): deterministic, with no
    mini-batches to draw.
    """
    weight = _checked_weight(layer, weight, scale, quant_min, quant_max, iterations)
    moments = _InputMoments(layer, inputs.detach().float(), weight)
    scale = scale.detach().float().reshape((-1, *[1] * (weight.dim() - 1)) if scale.numel() > 1 else ())
    scaled = weight / scale
    floor = scaled.floor()
    fraction = (scaled - floor).clamp(1e-4, 1 - 1e-4)  # h(V) = fraction, V finite
    v = (-torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)).requires_grad_()
    optimizer = torch.optim.Adam([v], lr=learning_rate)
    warm_up = int(WARM_UP * iterations)
    with torch.enable_grad():
        for step in range(iterations):
            rounding = _rectified_sigmoid(v)
            loss = moments.output_error(((floor + rounding).clamp(quant_min, quant_max) - scaled) * scale)
            if step >= warm_up:
                progress = (step - warm_up) / max(iterations - warm_up, 1)
                beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(math.pi * progress))
                loss = loss + REGULARIZATION * (1 - (2 * rounding - 1).abs().pow(beta)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (floor + (_rectified_sigmoid(v) >= 0.5)).clamp(quant_min, quant_max).to(torch.int8)


class _InputMoments:
    """The mean squared output error of a weight change, summed over output channels, over all inputs.

    A conv or linear output is W_g P per group g, with P the input patches (as the layer's own forward sees them,
    padding included) at every output position, so a weight change D adds D_g P, whose mean square over the M
    positions is sum_g trace(D_g (P P^T / M) D_g^T). P is the layer's output for an identity weight (one output
    channel per patch element); the error is then computed from the Gram matrix P P^T / M, at K * K per output
    channel and step (K: patch elements per group), or from P / sqrt(M) where there are fewer positions than K.
    Either way it is exact over every input at every step, at a cost per step that does not grow with them.
    """

    def __init__(self, layer: nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> None:
        self.groups, self.per_group = getattr(layer, "groups", 1), weight[0].numel()
        self.has_bias = getattr(layer, "bias", None) is not None
        in_channels = self.groups * weight.shape[1]
        size = max(1, PATCH_BUDGET // max(1, inputs[0].numel() // in_channels * self.groups * self.per_group))
        chunks = (self._patches(layer, chunk) for chunk in inputs.split(size))
        first = next(chunks)
        positions = first.shape[-1] // min(size, len(inputs)) * len(inputs)
        self._check(layer, inputs[:1], weight, first[..., : positions // len(inputs)])
        self.gram: torch.Tensor | None = None
        self.patches: torch.Tensor | None = None
        if self.per_group <= positions:
            self.gram = sum((torch.bmm(chunk, chunk.transpose(1, 2)) for chunk in chunks),
                            torch.bmm(first, first.transpose(1, 2))) / positions
        else:  # fewer positions than patch elements: the patches are the smaller factor
            self.patches = torch.cat([first, *chunks], -1) / math.sqrt(positions)

    def output_error(self, change: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the squared output error of weight change `change`, summed over channels."""
        per_group = change.reshape(self.groups, change.shape[0] // self.groups, -1)
        if self.gram is not None:
            return (torch.bmm(per_group, self.gram) * per_group).sum()
        return torch.bmm(per_group, self.patches).square().sum()

    def _run(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's forward on `x` with `weight` and no bias, as (groups, outputs per group, positions)."""
        params = {"weight": weight, "bias": torch.zeros(len(weight))} if self.has_bias else {"weight": weight}
        with torch.no_grad():
            out = functional_call(layer, params, (x,))
        if isinstance(layer, nn.Linear):
            return out.reshape(1, -1, len(weight)).transpose(1, 2)
        return out.reshape(len(out), self.groups, len(weight) // self.groups, -1).permute(1, 2, 0, 3).reshape(
            self.groups, len(weight) // self.groups, -1)

    def _patches(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(groups, patch elements, positions) patches of inputs `x`."""
        shape = layer.weight.shape
        identity = torch.eye(self.per_group).reshape(self.per_group, *shape[1:])
        return self._run(layer, x, identity.repeat(self.groups, *[1] * (len(shape) - 1)))

    def _check(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, patches: torch.Tensor) -> None:
        """Raise if the layer's output on one sample is not its weight times the patches found."""
        expected = self._run(layer, x, weight)
        found = torch.bmm(weight.reshape(self.groups, len(weight) // self.groups, -1), patches)
        if not torch.allclose(found, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max())):
            raise ValueError(
                f"The forward of {type(layer).__name__} is not its weight times its input patches (the output of an "
                "identity weight), so its rounding cannot be learned here: leave the layer out of layer_names.")


def adarounded(model: nn.Module, layer_names: Sequence[str], batches: Sequence[tuple], scales: Scales, *,
               weights: FloatWeights | None = None, samples: int = SAMPLES, iterations: int = ITERATIONS,
               time_limit: float | None = None) -> dict[str, torch.Tensor]:
    """{layer name: int8 weights} (`adaround_layer`) for the named conv/linear modules of FP32 `model`, in order.

    One layer at a time: the layer's inputs on the first `samples` samples of `batches` (tuples of model
    inputs; samples along axis 0) are captured by a forward pre-hook on a copy of `model` that shares its
    tensors (the pass stops once they are in; only that layer's inputs are kept), then rounded with
    `scales[name]` (`weight_scales`). weights: the FP32 (W, b) to round by name (`float_weights` of the prepared
    graph, BN folded) instead of the modules' own. Left out, so the caller keeps nearest rounding: names that
    are no conv/linear module (functional layers), or lack scales (or weights, if given), layers whose forward
    is not linear in their weight, layers the batches never reach, and every layer not started within
    `time_limit` seconds of the call (a started layer finishes, so the limit can be exceeded by one layer).
    Every layer learns on FP32 inputs, not on those of the layers quantized before it (the paper's asymmetric
    reconstruction, which AIMET uses, is not done).
    Memory: one layer's inputs at a time, `samples` times its input size (128 x 1.6 MB for MobileNetV2's
    largest layer input); fewer samples save memory and the moments' time, more suit layers with many inputs.
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive number of calibration samples per layer; got {samples}.")
    started = time.perf_counter()
    runner = eval_copy(model)
    rounded = {}
    for name in layer_names:
        if time_limit is not None and time.perf_counter() - started >= time_limit:
            break
        layer = float_layer(runner, name)
        unusable = layer is None or not scales_with_weight(layer)
        if unusable or name not in scales or (weights is not None and name not in weights):
            continue
        inputs = _layer_inputs(runner, layer, batches, samples)
        if inputs is None:
            continue
        scale, quant_min, quant_max = scales[name]
        weight = None if weights is None else weights[name][0]
        rounded[name] = adaround_layer(layer, inputs, scale, quant_min, quant_max, weight=weight,
                                       iterations=iterations)
    return rounded


def set_int8_weights(quantized: fx.GraphModule, weights: Mapping[str, torch.Tensor], *, engine: str,
                     layer_engines: Mapping[str, str] | None = None) -> list[str]:
    """Give each named static int8 conv/linear of a converted model the integer weights given (in place);
    returns the layers set.

    The module keeps its scales, zero points, channel axis and bias; only the integers change. FP32 fallbacks,
    dynamic int8 linears and names that are no module are left alone. engine, layer_engines: the kernel
    library each layer was packed for (the plan's `engine` and `layer_engines`); setting a weight re-packs it.
    """
    layer_engines = layer_engines or {}
    changed = []
    for name, module in static_int8_layers(quantized, weights.keys()):
        repack(module, _with_integers(name, module.weight(), weights[name]), module.bias(),
               layer_engines.get(name, engine))
        changed.append(name)
    return changed


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _checked_weight(layer: nn.Module, weight: torch.Tensor | None, scale: torch.Tensor, quant_min: int,
                    quant_max: int, iterations: int) -> torch.Tensor:
    """The FP32 weight to round (detached), once the arguments of `adaround_layer` are known to fit."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        raise TypeError(f"adaround_layer rounds nn.Conv1d/2d/3d and nn.Linear weights; got {type(layer).__name__}.")
    own = layer.weight
    weight = own if weight is None else weight
    if weight.shape != own.shape:
        raise ValueError(f"The weight to round has shape {tuple(weight.shape)}, but the {type(layer).__name__} "
                         f"runs one of shape {tuple(own.shape)}: pass the layer the weight belongs to.")
    if scale.numel() not in (1, own.shape[0]) or not bool((scale > 0).all()):
        raise ValueError(f"scale must be positive, one per output channel ({own.shape[0]}) or one per tensor; "
                         f"got shape {tuple(scale.shape)} with minimum {float(scale.min()):g}.")
    if not INT8_MIN <= quant_min < quant_max <= INT8_MAX:
        raise ValueError(f"quant_min, quant_max must be an int8 range ({INT8_MIN} <= min < max <= {INT8_MAX}); "
                         f"got ({quant_min}, {quant_max}).")
    if iterations < 1:
        raise ValueError(f"iterations must be a positive number of optimizer steps; got {iterations}.")
    return weight.detach().float()


def _layer_inputs(runner: nn.Module, layer: nn.Module, batches: Sequence[tuple], samples: int) -> torch.Tensor | None:
    """The first `samples` rows (axis 0) of `layer`'s FP32 inputs as `batches` run through `runner`, None if
    never reached. The pass stops once they are in; calls whose input shape differs from the first are skipped."""
    rows: list[torch.Tensor] = []

    def capture(_, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        if rows and x.shape[1:] != rows[0].shape[1:]:
            return
        rows.append(x[: samples - sum(len(row) for row in rows)].detach().clone())
        if sum(len(row) for row in rows) >= samples:
            raise _Captured

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in batches:
                runner(*batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    return torch.cat(rows) if rows else None


class _Captured(Exception):
    """Raised by the capturing hook to end the forward pass once the layer's inputs are in."""


def _with_integers(name: str, current: torch.Tensor, integers: torch.Tensor) -> torch.Tensor:
    """A qint8 tensor with `current`'s quantization parameters (per channel or per tensor) and `integers`."""
    if integers.shape != current.shape:
        raise ValueError(f"Layer '{name}' has int8 weights of shape {tuple(current.shape)}, but the integers given "
                         f"have shape {tuple(integers.shape)}: round the weights of this layer's float_weights.")
    if integers.is_floating_point() or int(integers.min()) < INT8_MIN or int(integers.max()) > INT8_MAX:
        raise ValueError(f"Layer '{name}' needs integer weights within [{INT8_MIN}, {INT8_MAX}]; got {integers.dtype} "
                         f"values from {float(integers.min()):g} to {float(integers.max()):g}.")
    integers = integers.to(torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        if current.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zero_points = current.q_per_channel_scales(), current.q_per_channel_zero_points()
            axis = current.q_per_channel_axis()
            shape = [-1 if dim == axis else 1 for dim in range(current.dim())]
            values = (integers - zero_points.reshape(shape)) * scales.reshape(shape)
            return torch.quantize_per_channel(values.float(), scales, zero_points, axis, torch.qint8)
        scale, zero_point = current.q_scale(), current.q_zero_point()
        return torch.quantize_per_tensor(((integers - zero_point) * scale).float(), scale, zero_point, torch.qint8)
