"""The search dimensions recipes share: fallbacks, observers, int8 ranges, kernels, fine-tune, lowering.

Per-layer FP32 fallback acts on the sensitivity ranking (fall back the n most sensitive layers)
instead of 2^L blind bits; the most sensitive layers also get their own observer choice. The kernel
choice is whole-model (an engine) or 'measured': every layer timed in place under FBGEMM and oneDNN
and packed for the faster one. Each recipe's `suggest` composes these (autoq.recipes.recipe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from autoq.config import SearchSpace
from autoq.plan import INDUCTOR, MEASURED, OPENVINO, RECIPE_KINDS, REWRITES

if TYPE_CHECKING:
    import optuna

    from autoq.recipes.arms import Arms

GLOBAL = "global"  # a layer observer choice meaning "use the plan's activation_observer"
PERCENTILES = (99.9, 99.99, 99.999)


class Dimensions:
    """A search space applied to one run's arms and layer rankings (most sensitive layers first)."""

    def __init__(self, space: SearchSpace, arms: Arms, rankings: Mapping[str, list[str]],
                 compile_float: bool = True) -> None:
        """compile_float: the float recipes' plans may be compiled (else eager only, e.g. for fast tests)."""
        self.space, self.arms, self.rankings = space, arms, rankings
        self.several = len(arms.recipes) > 1  # only then is 'recipe' a trial parameter
        self.float_rewrites = REWRITES if compile_float else tuple(r for r in REWRITES if r != "compiled")

    def recipe_param(self, recipe: str) -> dict:
        """The 'recipe' parameter of a seed of `recipe` (none when only one recipe is searched)."""
        return {"recipe": recipe} if self.several else {}

    def seed_kernels(self) -> list[str]:
        """The kernel choices seeds are made for, x86 first and 'measured' last."""
        return sorted(self.space.kernels, key=lambda kernels: (kernels != "x86", kernels == MEASURED))

    def int8_ranges(self, trial: optuna.Trial, kernels: str, prefix: str, recipe: str) -> dict:
        """reduce_range and weight bits: where the kernels cannot saturate (VNNI/AMX), 8-bit weights and
        reduce_range as searched (Inductor: full 8-bit, its quantizer's default there); where they can
        (AVX2 without VNNI), either 7-bit activations (reduce_range) or 7-bit weights with 8-bit
        activations (8-bit weights kept on the layers whose kernels sum exactly), so no plan is spent
        on sums the hardware saturates."""
        arms = self.arms
        safe = arms.full_range_safe(kernels)
        if kernels == INDUCTOR and safe:
            return {"reduce_range": False, "weight_bits": 8}
        reduce_range = trial.suggest_categorical(f"{prefix}reduce_range", self.space.reduce_range)
        if reduce_range or safe:
            return {"reduce_range": reduce_range, "weight_bits": 8}
        exact = {layer: 8 for layer in arms.layers(recipe)  # e.g. oneDNN's depthwise convs without VNNI
                 if arms.int8.full_range_safe(kernels, arms.layer_kinds(layer))}
        return {"reduce_range": False, "weight_bits": 7, "layer_weight_bits": exact}

    def fallbacks(self, trial: optuna.Trial, recipe: str, prefix: str) -> list[str]:
        """The FP32 layers: the n most sensitive of `recipe`'s layers, n searched."""
        ranking = self.rankings[recipe]
        return list(ranking[:trial.suggest_int(f"{prefix}n_fallback", 0, self.space.fallback_limit(len(ranking)))])

    def fallback_seed(self, seed: dict, recipe: str, prefix: str) -> list[dict]:
        """`seed` with its recipe's most sensitive layer in FP32, if the space allows fallbacks: a second seed,
        because one layer int8 kernels cannot hold (a classifier head with outlier weights) can make a
        recipe's default look hopeless and get it dropped before its fallbacks are searched."""
        allowed = self.space.fallback_limit(len(self.rankings[recipe])) >= 1
        return [{**seed, f"{prefix}n_fallback": 1}] if allowed else []

    def fallbacks_kernels_weights(self, trial: optuna.Trial, recipe: str) -> dict:
        """QuantPlan fields of a dynamic or QAT plan: its recipe, fallbacks, kernels and weight granularity
        (parameters prefixed with the recipe, but for the shared 'engine')."""
        fp32_layers = self.fallbacks(trial, recipe, f"{recipe}:")
        kernels = trial.suggest_categorical("engine", self.space.kernels)
        return {"recipe": recipe, **kernel_choice(kernels), "fp32_layers": fp32_layers,
                "weight_granularity": trial.suggest_categorical(f"{recipe}:weight_granularity",
                                                                self.space.weight_granularities)}

    def fine_tune(self, trial: optuna.Trial, prefix: str) -> dict:
        """A QAT plan's starting activation ranges (observer), fine-tune length (epochs) and learning rate."""
        observer = trial.suggest_categorical(f"{prefix}activation_observer", self.space.observers)
        return {"activation_observer": observer,
                "percentile": (trial.suggest_categorical(f"{prefix}percentile", PERCENTILES)
                               if observer == "percentile" else 99.99),
                "qat_epochs": trial.suggest_int(f"{prefix}epochs", *self.space.qat_epochs),
                "qat_lr": trial.suggest_float(f"{prefix}lr", *self.space.qat_lr, log=True)}

    def fine_tune_seed(self) -> dict:
        """Seed values of `fine_tune` (unprefixed): histogram ranges as the post-training seeds, the
        longest fine-tune (epochs cost tuning time, not inference speed) and a mid learning rate."""
        return {"activation_observer": closest("histogram", self.space.observers), "epochs": self.space.qat_epochs[1],
                "lr": min(max(1e-4, self.space.qat_lr[0]), self.space.qat_lr[1])}

    def ranges(self, trial: optuna.Trial, recipe: str, prefix: str) -> tuple[dict, bool]:
        """QuantPlan fields activation_observer, fp32_layers and layer_observers (the most sensitive
        layers' own observers), and whether any of them uses 'percentile'."""
        observer = trial.suggest_categorical(f"{prefix}activation_observer", self.space.observers)
        fp32_layers = self.fallbacks(trial, recipe, prefix)
        layer_observers = {}
        for layer in self.rankings[recipe][: self.space.layer_observer_slots]:
            choice = trial.suggest_categorical(f"{prefix}observer:{layer}", (GLOBAL, *self.space.observers))
            if choice != GLOBAL:
                layer_observers[layer] = choice
        fields = {"activation_observer": observer, "fp32_layers": fp32_layers, "layer_observers": layer_observers}
        return fields, "percentile" in (observer, *layer_observers.values())

    def ranges_seed(self, recipe: str, prefix: str) -> dict:
        """Seed values of `ranges` but the fallbacks: histogram ranges, no per-layer observer."""
        return {f"{prefix}activation_observer": closest("histogram", self.space.observers),
                **{f"{prefix}observer:{layer}": GLOBAL
                   for layer in self.rankings[recipe][: self.space.layer_observer_slots]}}

    def _recovery_choices(self, fields: Sequence[str]) -> dict[str, tuple[object, Sequence]]:
        """The recovery plan fields among `fields` (a recipe's) -> (their default, the space's choices)."""
        choices = {"equalization": ("none", self.space.equalizations),
                   "bias_correction": (False, self.space.bias_correction), "adaround": (False, self.space.adaround)}
        return {name: choice for name, choice in choices.items() if name in fields}

    def recovery(self, trial: optuna.Trial, prefix: str, fields: Sequence[str]) -> dict:
        """Accuracy recovery beyond ranges and fallbacks, as far as the recipe's plan `fields` have it: an FP32
        rewrite (BatchNorm folding, cross-layer equalization), bias correction and learned rounding."""
        return {name: trial.suggest_categorical(f"{prefix}{name}", choices)
                for name, (_, choices) in self._recovery_choices(fields).items()}

    def recovery_seed(self, prefix: str, fields: Sequence[str]) -> dict:
        """Seed values of `recovery`: none (PyTorch's defaults have none)."""
        return {f"{prefix}{name}": closest(default, choices)
                for name, (default, choices) in self._recovery_choices(fields).items()}

    def recovery_variants(self, seed: dict, prefix: str, fields: Sequence[str]) -> list[dict]:
        """`seed` with bias correction (if allowed), alone and with each rewrite the space allows, then
        with learned rounding too (if allowed): a few trials that show what each is worth."""
        allowed = {name: choices for name, (_, choices) in self._recovery_choices(fields).items()}
        correct = {f"{prefix}bias_correction": True} if True in allowed.get("bias_correction", ()) else {}
        variants = [{**seed, **correct}] if correct else []
        variants += [{**seed, **correct, f"{prefix}equalization": rewrite}
                     for rewrite in allowed.get("equalization", ()) if rewrite != "none"]
        if True in allowed.get("adaround", ()):
            variants.append({**seed, **correct, f"{prefix}adaround": True})
        return variants

    def percentile(self, trial: optuna.Trial, prefix: str, used: bool) -> float:
        return trial.suggest_categorical(f"{prefix}percentile", PERCENTILES) if used else 99.99

    def calib_samples(self, trial: optuna.Trial, prefix: str) -> int:
        """How many calibration samples' statistics set the ranges (the snapshots taken)."""
        return trial.suggest_categorical(f"{prefix}calib_samples", tuple(self.arms.checkpoints))

    def lowerings(self, recipe: str) -> tuple[str, ...]:
        """What may compile a PT2E recipe's graph: the space's lowerings, OpenVINO only for static graphs and
        where it is installed (Inductor if that leaves none)."""
        allowed = tuple(lowering for lowering in self.space.lowerings if lowering == INDUCTOR
                        or (self.arms.openvino and not RECIPE_KINDS[recipe].dynamic))
        return allowed or (INDUCTOR,)

    def inductor_lowering(self, trial: optuna.Trial, recipe: str) -> dict:
        """A PT2E plan's lowering (Inductor or OpenVINO) and its options (Inductor's cpp_wrapper, mixed_bf16
        where the CPU has bf16), and int8 ranges."""
        prefix, lowerings = f"{recipe}:", self.lowerings(recipe)
        lowering = trial.suggest_categorical(f"{prefix}lowering", lowerings) if len(lowerings) > 1 else lowerings[0]
        return {"lowering": lowering,
                "cpp_wrapper": lowering == INDUCTOR and trial.suggest_categorical(f"{prefix}cpp_wrapper",
                                                                                  self.space.cpp_wrapper),
                "mixed_bf16": self.arms.bf16 and trial.suggest_categorical(f"{prefix}mixed_bf16",
                                                                           self.space.mixed_bf16),
                **self.int8_ranges(trial, INDUCTOR, prefix, recipe)}

    def inductor_lowering_seed(self, recipe: str) -> dict:
        """X86InductorQuantizer's defaults (no bf16, 7-bit activations where the CPU lacks VNNI, as it advises),
        lowered by OpenVINO where it may be, else by Inductor with its Python wrapper. OpenVINO first: on
        MobileNetV2 Inductor's lowering of the same graph lost 85% top-1 and ran 2.9x slower, and a recipe
        whose seeds fail is dropped before its sweep would try the other lowering."""
        prefix, lowerings = f"{recipe}:", self.lowerings(recipe)
        lowering = OPENVINO if OPENVINO in lowerings else INDUCTOR
        seed = {f"{prefix}lowering": lowering} if len(lowerings) > 1 else {}
        if lowering == INDUCTOR:
            seed[f"{prefix}cpp_wrapper"] = closest(False, self.space.cpp_wrapper)
        if not self.arms.full_range_safe(INDUCTOR):
            seed[f"{prefix}reduce_range"] = closest(True, self.space.reduce_range)
        if self.arms.bf16:
            seed[f"{prefix}mixed_bf16"] = closest(False, self.space.mixed_bf16)
        return seed

    def inductor_lowering_variants(self, seed: dict, recipe: str) -> list[dict]:
        """`seed` with each other lowering (OpenVINO: without Inductor's cpp_wrapper), lowering option and int8
        range the space allows."""
        cpp_wrapper, python_wrapper = f"{recipe}:cpp_wrapper", closest(False, self.space.cpp_wrapper)
        variants = [{**{key: value for key, value in seed.items() if key != cpp_wrapper},
                     f"{recipe}:lowering": lowering,
                     **({cpp_wrapper: seed.get(cpp_wrapper, python_wrapper)} if lowering == INDUCTOR else {})}
                    for lowering in self.lowerings(recipe) if f"{recipe}:lowering" in seed]
        return variants + [{**seed, f"{recipe}:{name}": value} for name, values in
                           (("cpp_wrapper", self.space.cpp_wrapper), ("mixed_bf16", self.space.mixed_bf16),
                            ("reduce_range", self.space.reduce_range))
                           if f"{recipe}:{name}" in seed for value in values]

    def observer_variants(self, seed: dict, prefix: str) -> list[dict]:
        """`seed` with every observer method the space allows (each percentile for 'percentile')."""
        variants = []
        for observer in self.space.observers:
            params = {**seed, f"{prefix}activation_observer": observer}
            if observer == "percentile":
                variants += [{**params, f"{prefix}percentile": percentile} for percentile in PERCENTILES]
            else:
                variants.append(params)
        return variants


def kernels_of(fields: dict) -> str:
    """The kernel choice (as `kernel_choice` takes it) of a plan's fields."""
    return MEASURED if fields["dispatch"] == MEASURED else fields["engine"]


def kernel_choice(kernels: str) -> dict[str, str]:
    """Plan fields of a kernel choice: an engine, or 'measured' per-layer dispatch (from x86's packing)."""
    return {"engine": "x86", "dispatch": MEASURED} if kernels == MEASURED else {"engine": kernels, "dispatch": "engine"}


def unique(params: list[dict]) -> list[dict]:
    """`params` without repeats, in order."""
    return [p for i, p in enumerate(params) if p not in params[:i]]


def closest(default: object, allowed: tuple) -> object:
    """`default` if the space allows it, else the space's first allowed value."""
    return default if default in allowed else allowed[0]
