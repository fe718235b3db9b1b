"""A quantization candidate as plain, versioned, serializable data.

One `QuantPlan` fully describes how `autoq.recipes` turns an FP32 model (plus the calibration
statistics of that model) into an int8 model. Plans are what the search proposes, what a tuning
run returns in `TuneResult.plan`, and what `autoq.quantize` rebuilds from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

PLAN_TYPE = "autoq.QuantPlan"
PLAN_VERSION = 7
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # older plans lack the dispatch (v1), Inductor options (v2), weight_bits
# (v3), accuracy recovery (v4), float precision (v5) and lowering (v6) fields;
# their defaults apply, but for the PT2E recipes, which ignored reduce_range before v4 (8-bit activations)

ENGINES = ("x86", "fbgemm", "onednn")
OBSERVERS = ("minmax", "moving_average", "histogram", "percentile", "kl")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
EQUALIZATIONS = ("none", "fold_bn", "cross_layer")  # FP32 rewrites before capture (autoq.recover.equalize)
WEIGHT_BITS = (8, 7)  # 7: weights in [-63, 63], so u8 x s8 pair sums fit int16 (CPUs without VNNI)
PRECISIONS = ("int8", "fp32", "bf16")  # what a deployment computes in; fp32 and bf16 plans quantize nothing
REWRITES = ("none", "folded", "compiled")  # a float plan's FP32 rewrite (autoq.measure.fp32.best_float)
# what compiles a PT2E plan's int8 graph: Inductor (oneDNN int8 kernels), or OpenVINO (autoq.recipes.openvino)
LOWERINGS = ("inductor", "openvino")
NEW_FIELDS = ("rewrite", "lowering")  # fields since plan v6: in a plan's key only when set, so older plans keep keys


@dataclass(frozen=True)
class RecipeKind:
    """What a plan needs to know of a recipe; its behaviour (build, search dimensions, ...) is its
    `autoq.recipes.recipe.Recipe`, registered in `autoq.recipes.registry`.

    fields: the plan fields it reads beyond fallbacks and kernels.
    inductor: compiled by Inductor, which picks kernels itself: no engine or per-layer kernels.
    calibrated: activation ranges from calibration statistics (calib_samples applies).
    dynamic: activations quantized per call at run time (no observers).
    fine_tunes: for a quantization-aware fine-tune, the post-training recipe it starts from (its twin).
    precision: what the recipe's models compute in: 'int8', or 'fp32'/'bf16' for the float recipes (the
      FP32 model rewritten and lowered; the candidates int8 has to beat).
    """

    name: str
    fields: tuple[str, ...] = ()
    inductor: bool = False
    calibrated: bool = False
    dynamic: bool = False
    fine_tunes: str | None = None
    precision: str = "int8"


_INDUCTOR_FIELDS = ("mixed_bf16", "cpp_wrapper")
# The built-in recipes (plans of every version name only these); autoq.recipes.registry.register adds more.
RECIPE_KINDS: dict[str, RecipeKind] = {kind.name: kind for kind in (
    RecipeKind("static", ("activation_observer", "weight_granularity", "activation_symmetric", "reduce_range",
                          "weight_bits", "channels_last", "fold_relu6", "equalization", "bias_correction", "adaround"),
               calibrated=True),
    RecipeKind("dynamic", ("weight_granularity",), dynamic=True),
    RecipeKind("qat", ("activation_observer", "weight_granularity", "reduce_range", "weight_bits", "qat_epochs",
                       "qat_lr"), fine_tunes="static"),
    RecipeKind("pt2e-static", ("activation_observer", "reduce_range", "weight_bits", "bias_correction",
                               *_INDUCTOR_FIELDS),
               inductor=True, calibrated=True),
    RecipeKind("pt2e-dynamic", ("reduce_range", "weight_bits", *_INDUCTOR_FIELDS), inductor=True, dynamic=True),
    RecipeKind("pt2e-qat", ("activation_observer", "reduce_range", "weight_bits", "qat_epochs", "qat_lr",
                            *_INDUCTOR_FIELDS), inductor=True, fine_tunes="pt2e-static"),
    RecipeKind("fp32", ("rewrite",), precision="fp32"),
    RecipeKind("bf16", ("rewrite",), precision="bf16"),
)}
LIBRARIES = ("fbgemm", "onednn")
MEASURED = "measured"  # kernel choice: per layer, by timing each layer under both libraries
KERNEL_CHOICES = (*ENGINES, MEASURED)
INDUCTOR = "inductor"  # the PT2E recipes' default kernels: Inductor lowers int8 ops to oneDNN
OPENVINO = "openvino"  # a PT2E plan lowered by OpenVINO: its CPU plugin's int8 kernels
EAGER = "eager"  # an uncompiled float plan's kernels: PyTorch's eager FP32/bf16 ops
AUTO = "auto"  # recipe choice: the recipes that apply to the model (autoq.recipes.arms)
DISPATCH = ("engine", "measured", "table")


def recipe_kind(name: str) -> RecipeKind:
    """The kind of recipe `name`; a clear error for a name no recipe has."""
    if name not in RECIPE_KINDS:
        raise ValueError(f"Unknown recipe {name!r}; the recipes are {list(RECIPE_KINDS)}.")
    return RECIPE_KINDS[name]


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"The '{name}' parameter of QuantPlan must be one of {list(allowed)}. Got {value!r} instead."
        )


@dataclass
class QuantPlan:
    """Per-layer choices that rebuild one int8 candidate.

    engine: int8 kernel library used when weights are prepacked ('x86' lets PyTorch pick per layer).
    activation_observer: how activation ranges are computed from calibration statistics (for 'qat' and
      'pt2e-qat': the ranges the fine-tune starts from, then learns).
    layer_observers: per-layer override of `activation_observer` for the layer's output tensor.
    fp32_layers: layers (module names in the captured graph) that stay in FP32.
    reduce_range: 7-bit activations (0..127; PyTorch's x86 default), which keep int8 sums from
      saturating on CPUs without VNNI; `weight_bits=7` is the other way (8-bit activations). (FX
      'dynamic': PyTorch's kernels quantize activations to 7 bits per call whatever the plan says.)
    weight_bits: 8, or 7 (weights in [-63, 63]: u8 x s8 pair sums fit int16 on CPUs without VNNI).
    layer_weight_bits: per-layer override of `weight_bits` (e.g. 8 for depthwise convs whose kernel
      sums exactly where the others saturate).
    calib_samples: number of calibration samples whose statistics are used (None: all).
    percentile: upper percentile (in %) used by the 'percentile' observer.
    fold_relu6: fuse Conv -> ReLU6 into ConvReLU with output range [0, min(6, max)].
    dispatch: how layer_engines were chosen: 'engine' (none: every layer follows `engine`),
      'measured' (each layer timed in place under both libraries), 'table' (a DispatchTable).
    layer_engines: per-layer kernel library ('fbgemm' or 'onednn') overriding `engine`.
    mixed_bf16: (Inductor recipes) run the int8 model under bf16 autocast: int8-mixed-bf16, the
      non-quantized ops in bf16 (needs a CPU with bf16 support).
    cpp_wrapper: (Inductor recipes) compile with Inductor's C++ wrapper instead of its Python one.
    lowering: (PT2E recipes but 'pt2e-dynamic') what compiles the int8 graph: 'inductor' (torch.compile),
      or 'openvino' (the same quantize/dequantize graph converted by OpenVINO and run by its CPU plugin;
      extra `openvino`); with mixed_bf16, OpenVINO runs the float ops in bf16.
    equalization: a rewrite of the FP32 model before capture (`autoq.recover.equalize`): 'none';
      'fold_bn' (BatchNorm folded into the layer before it, also where FX quantization would keep it a
      separate int8 op: behind a conv subclass with its own forward; the same FP32 function);
      'cross_layer' (folded, then cross-layer equalization, Nagel et al. 2019: the per-channel weight
      ranges of consecutive conv/linear pairs equalized, a ReLU6 between them replaced by ReLU).
    adaround: learned weight rounding (AdaRound, Nagel et al. 2020): each layer's int8 weights rounded up
      or down to reproduce its FP32 outputs on calibration inputs (`autoq.recover.adaround`; minutes on
      a large model, once per weight quantization).
    bias_correction: each int8 layer's bias corrected for the mean output shift its weight rounding
      causes, (W_int8 - W) E[x], with E[x] from the calibration data (`autoq.recover.bias`; for
      'pt2e-static', `autoq.recover.graph_bias`).
    qat_epochs, qat_lr: (recipes 'qat', 'pt2e-qat') length and Adam learning rate (cosine decay) of the
      quantization-aware fine-tune.
    rewrite: (float recipes 'fp32', 'bf16') 'none': the model as given; 'folded': BatchNorm folded and
      channels_last, eager; 'compiled': folded, then torch.compile with frozen weights (Inductor).
    """

    recipe: str = "static"
    engine: str = "x86"
    activation_observer: str = "histogram"
    layer_observers: dict[str, str] = field(default_factory=dict)
    fp32_layers: list[str] = field(default_factory=list)
    weight_granularity: str = "per_channel"
    activation_symmetric: bool = False
    reduce_range: bool = True
    weight_bits: int = 8
    layer_weight_bits: dict[str, int] = field(default_factory=dict)
    calib_samples: int | None = None
    percentile: float = 99.99
    channels_last: bool = False
    fold_relu6: bool = False
    dispatch: str = "engine"
    layer_engines: dict[str, str] = field(default_factory=dict)
    mixed_bf16: bool = False
    cpp_wrapper: bool = False
    equalization: str = "none"
    bias_correction: bool = False
    adaround: bool = False
    qat_epochs: int = 1
    qat_lr: float = 1e-4
    rewrite: str = "compiled"
    lowering: str = "inductor"

    def __post_init__(self) -> None:
        _check_choice("recipe", self.recipe, tuple(RECIPE_KINDS))
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("activation_observer", self.activation_observer, OBSERVERS)
        for layer, observer in self.layer_observers.items():
            _check_choice(f"layer_observers[{layer!r}]", observer, OBSERVERS)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        _check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        _check_choice("equalization", self.equalization, EQUALIZATIONS)
        for layer, bits in self.layer_weight_bits.items():
            _check_choice(f"layer_weight_bits[{layer!r}]", bits, WEIGHT_BITS)
        _check_choice("dispatch", self.dispatch, DISPATCH)
        for layer, library in self.layer_engines.items():
            _check_choice(f"layer_engines[{layer!r}]", library, LIBRARIES)
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ValueError(
                f"The 'calib_samples' parameter of QuantPlan must be a positive int or None. "
                f"Got {self.calib_samples!r} instead."
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(
                f"The 'percentile' parameter of QuantPlan must be in (50, 100]. Got {self.percentile!r} instead."
            )
        inductor = RECIPE_KINDS[self.recipe].inductor
        if not inductor and (self.mixed_bf16 or self.cpp_wrapper):
            raise ValueError(f"mixed_bf16 and cpp_wrapper apply to the Inductor recipes "
                             f"{[name for name, kind in RECIPE_KINDS.items() if kind.inductor]}, "
                             f"not to recipe {self.recipe!r}.")
        _check_choice("rewrite", self.rewrite, REWRITES)
        _check_choice("lowering", self.lowering, LOWERINGS)
        kind = RECIPE_KINDS[self.recipe]
        if self.lowering != INDUCTOR and (not inductor or kind.dynamic or self.cpp_wrapper):
            raise ValueError(f"lowering={self.lowering!r} applies to the static PT2E recipes "
                             f"{[name for name, k in RECIPE_KINDS.items() if k.inductor and not k.dynamic]}, "
                             f"without cpp_wrapper (Inductor's option); got recipe {self.recipe!r}"
                             f"{' with cpp_wrapper' if self.cpp_wrapper else ''}.")
        if self.rewrite != "compiled" and RECIPE_KINDS[self.recipe].precision == "int8":
            raise ValueError(f"rewrite applies to the float recipes "
                             f"{[name for name, kind in RECIPE_KINDS.items() if kind.precision != 'int8']}, "
                             f"not to recipe {self.recipe!r}.")
        if inductor and (self.layer_engines or self.dispatch != "engine"):
            raise ValueError(f"Recipe {self.recipe!r} is compiled by Inductor, which picks its own kernels: "
                             f"per-layer kernel choices (layer_engines, dispatch) do not apply.")
        if not (isinstance(self.qat_epochs, int) and self.qat_epochs >= 1 and 0 < self.qat_lr < 1):
            raise ValueError(f"QuantPlan needs qat_epochs >= 1 and 0 < qat_lr < 1. Got {self.qat_epochs!r}, "
                             f"{self.qat_lr!r}.")
        self.fp32_layers = sorted(set(self.fp32_layers))

    def observer_for(self, layer: str | None) -> str:
        """The activation observer used for the output of `layer` (None: tensors owned by no layer);
        'dynamic' when activations are quantized per call at run time."""
        if RECIPE_KINDS[self.recipe].dynamic:
            return "dynamic"
        return self.layer_observers.get(layer, self.activation_observer) if layer else self.activation_observer

    def weight_bits_for(self, layer: str) -> int:
        """The weight bits of `layer` (8 or 7)."""
        return self.layer_weight_bits.get(layer, self.weight_bits)

    def layer_table(self, layers: list[str], sensitivity: dict[str, float]) -> list[dict[str, Any]]:
        """Per layer: name, sqnr_db (output SQNR in dB with only it int8), quantized, observer, engine,
        weight_bits."""
        return [{
            "name": layer, "sqnr_db": sensitivity.get(layer), "quantized": layer not in self.fp32_layers,
            "observer": self.observer_for(layer), "engine": self.layer_engines.get(layer, self.engine),
            "weight_bits": self.weight_bits_for(layer),
        } for layer in layers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form: {'_type', '_version', '_data'}."""
        return {"_type": PLAN_TYPE, "_version": PLAN_VERSION, "_data": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        """Inverse of `to_dict`; rejects other types and unknown versions with a clear error."""
        if not isinstance(data, dict) or data.get("_type") != PLAN_TYPE:
            raise ValueError(f"Not an autoq plan (expected '_type': {PLAN_TYPE!r}): {str(data)[:200]}")
        if data.get("_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"autoq plan version {data.get('_version')!r} is not supported by this autoq "
                f"(supports {list(READABLE_VERSIONS)}); re-run tuning or upgrade autoq."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data["_data"]) - known
        if unknown:
            raise ValueError(f"Unknown QuantPlan fields {sorted(unknown)}; allowed: {sorted(known)}.")
        fields = dict(data["_data"])
        if data["_version"] < 4 and fields.get("recipe") in ("pt2e-static", "pt2e-dynamic", "pt2e-qat"):
            fields["reduce_range"] = False  # what these plans were built with
        return cls(**fields)

    def kernels(self) -> str:
        """The kernel choice in short: the engine ('x86', 'fbgemm', 'onednn'), or per-layer dispatch
        as e.g. 'measured 18/35' (oneDNN/FBGEMM layers; just 'measured' before the layers are timed); a PT2E
        plan's lowering ('inductor', 'openvino'); a float plan's 'inductor' (compiled) or 'eager'."""
        if RECIPE_KINDS[self.recipe].inductor:
            return self.lowering
        if RECIPE_KINDS[self.recipe].precision != "int8":
            return INDUCTOR if self.rewrite == "compiled" else EAGER
        if not self.layer_engines:
            return self.engine if self.dispatch == "engine" else self.dispatch
        onednn = sum(library == "onednn" for library in self.layer_engines.values())
        return f"{self.dispatch} {onednn}/{len(self.layer_engines) - onednn}"

    def key(self) -> str:
        """Stable short hash: equal plans build identical models."""
        fields = dataclasses.asdict(self)
        for name in NEW_FIELDS:
            if fields[name] == getattr(QuantPlan, name):
                del fields[name]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def default_plan(engine: str = "x86") -> QuantPlan:
    """PyTorch's default FX post-training recipe for `engine` (get_default_qconfig_mapping)."""
    return QuantPlan(engine=engine, reduce_range=engine != "onednn")
