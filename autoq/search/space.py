"""The search space: turns an Optuna trial into a QuantPlan.

Per-layer FP32 fallback acts on the sensitivity ranking (fall back the n most sensitive layers)
instead of 2^L blind bits; the most sensitive layers also get their own observer choice. The kernel
choice is whole-model (an engine) or 'measured': every layer timed in place under FBGEMM and oneDNN
and packed for the faster one.
"""

from __future__ import annotations

import optuna

from autoq.config import SearchSpace
from autoq.plan import INDUCTOR_RECIPES, MEASURED, OBSERVERS, PT2E_POST_TRAINING, QuantPlan, default_plan
from autoq.recipes.arms import Arms

GLOBAL = "global"  # a layer observer choice meaning "use the plan's activation_observer"
INDUCTOR = "inductor"  # the PT2E recipes' kernels: Inductor lowers int8 ops to oneDNN
PERCENTILES = (99.9, 99.99, 99.999)


class PlanProposer:
    """The search's side of a SearchSpace: plans for Optuna trials, and the seeds and sweeps it enqueues."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def suggest(self, trial: optuna.Trial, arms: Arms) -> QuantPlan:
        """The plan for this trial.

        With several recipes the trial first picks one ('recipe'); plans of other recipes than static
        have their own parameters ('dynamic:...', 'pt2e-static:...'). A 'measured' kernel choice returns a plan with
        dispatch='measured' and no layer_engines yet: the objective times the layers of the built
        candidate to fill them. Fallbacks follow `arms.rankings` (most sensitive layers first).
        """
        recipe = trial.suggest_categorical("recipe", arms.recipes) if len(arms.recipes) > 1 else arms.recipes[0]
        ranking = arms.rankings[recipe]
        if recipe == "dynamic":
            return QuantPlan(**self._fallbacks_kernels_weights(trial, recipe, ranking))
        if recipe in INDUCTOR_RECIPES:
            return self._suggest_inductor(trial, arms, recipe)
        if recipe == "qat":
            fields = self._fallbacks_kernels_weights(trial, recipe, ranking)
            return QuantPlan(**fields, **self._int8_ranges(trial, arms, _kernels_of(fields), "qat:", recipe),
                             **self._suggest_fine_tune(trial, "qat:"))
        relu6, calib_counts = arms.has_relu6, arms.checkpoints
        observer, n_fallback, layer_observers, uses_percentile = self._suggest_ranges(trial, ranking, "")
        kernels = trial.suggest_categorical("engine", self.space.engines)
        ranges = self._int8_ranges(trial, arms, kernels, "", recipe)
        # a folded conv's output uses the full 8-bit range whatever reduce_range says
        may_fold = relu6 and (ranges["weight_bits"] == 7 or arms.full_range_safe(kernels))
        return QuantPlan(
            **_kernel_choice(kernels),
            activation_observer=observer,
            layer_observers=layer_observers,
            fp32_layers=list(ranking[:n_fallback]),
            weight_granularity=trial.suggest_categorical("weight_granularity", self.space.weight_granularities),
            activation_symmetric=trial.suggest_categorical("activation_symmetric", self.space.activation_symmetric),
            **ranges,
            calib_samples=trial.suggest_categorical("calib_samples", tuple(calib_counts)),
            percentile=trial.suggest_categorical("percentile", PERCENTILES) if uses_percentile else 99.99,
            channels_last=trial.suggest_categorical("channels_last", self.space.channels_last),
            fold_relu6=may_fold and trial.suggest_categorical("fold_relu6", self.space.fold_relu6),
        )

    def _int8_ranges(self, trial: optuna.Trial, arms: Arms, kernels: str, prefix: str, recipe: str) -> dict:
        """reduce_range and weight bits: where the kernels cannot saturate (VNNI/AMX), 8-bit weights and
        reduce_range as searched (PT2E: full 8-bit, its quantizer's default there); where they can (AVX2
        without VNNI), either 7-bit activations (reduce_range) or 7-bit weights with 8-bit activations
        (8-bit weights kept on the layers whose kernels sum exactly), so no plan is spent on sums the
        hardware saturates."""
        safe = arms.full_range_safe(kernels)
        if kernels == INDUCTOR and safe:
            return {"reduce_range": False, "weight_bits": 8}
        reduce_range = trial.suggest_categorical(f"{prefix}reduce_range", self.space.reduce_range)
        if reduce_range or safe:
            return {"reduce_range": reduce_range, "weight_bits": 8}
        exact = {layer: 8 for layer in arms.layers(recipe)  # e.g. oneDNN's depthwise convs without VNNI
                 if arms.int8.full_range_safe(kernels, arms.layer_kinds(layer))}
        return {"reduce_range": False, "weight_bits": 7, "layer_weight_bits": exact}

    def _fallbacks_kernels_weights(self, trial: optuna.Trial, recipe: str, ranking: list[str]) -> dict:
        """QuantPlan fields of a dynamic or QAT plan: its recipe, fallbacks, kernels and weight granularity
        (parameters prefixed with the recipe, but for the shared 'engine')."""
        n_fallback = trial.suggest_int(f"{recipe}:n_fallback", 0, self.space.fallback_limit(len(ranking)))
        kernels = trial.suggest_categorical("engine", self.space.engines)
        return {"recipe": recipe, **_kernel_choice(kernels), "fp32_layers": list(ranking[:n_fallback]),
                "weight_granularity": trial.suggest_categorical(f"{recipe}:weight_granularity",
                                                                self.space.weight_granularities)}

    def _suggest_fine_tune(self, trial: optuna.Trial, prefix: str) -> dict:
        """A QAT plan's starting activation ranges (observer), fine-tune length (epochs) and learning rate."""
        observer = trial.suggest_categorical(f"{prefix}activation_observer", self.space.observers)
        return {"activation_observer": observer,
                "percentile": (trial.suggest_categorical(f"{prefix}percentile", PERCENTILES)
                               if observer == "percentile" else 99.99),
                "qat_epochs": trial.suggest_int(f"{prefix}epochs", *self.space.qat_epochs),
                "qat_lr": trial.suggest_float(f"{prefix}lr", *self.space.qat_lr, log=True)}

    def _suggest_ranges(self, trial: optuna.Trial, ranking: list[str], prefix: str
                        ) -> tuple[str, int, dict[str, str], bool]:
        """Activation observer, number of FP32 fallbacks, per-layer observers and whether any uses percentile."""
        observer = trial.suggest_categorical(f"{prefix}activation_observer", self.space.observers)
        n_fallback = trial.suggest_int(f"{prefix}n_fallback", 0, self.space.fallback_limit(len(ranking)))
        layer_observers = {}
        for layer in ranking[: self.space.layer_observer_slots]:
            choice = trial.suggest_categorical(f"{prefix}observer:{layer}", (GLOBAL, *self.space.observers))
            if choice != GLOBAL:
                layer_observers[layer] = choice
        return observer, n_fallback, layer_observers, "percentile" in (observer, *layer_observers.values())

    def _suggest_inductor(self, trial: optuna.Trial, arms: Arms, recipe: str) -> QuantPlan:
        """A PT2E plan: its parameters are prefixed with the recipe ('pt2e-static:n_fallback', ...)."""
        prefix, ranking = f"{recipe}:", arms.rankings[recipe]
        lowering = {"cpp_wrapper": trial.suggest_categorical(f"{prefix}cpp_wrapper", self.space.cpp_wrapper),
                    "mixed_bf16": arms.bf16 and trial.suggest_categorical(f"{prefix}mixed_bf16", self.space.mixed_bf16),
                    **self._int8_ranges(trial, arms, INDUCTOR, prefix, recipe)}
        if recipe in ("pt2e-dynamic", "pt2e-qat"):
            n_fallback = trial.suggest_int(f"{prefix}n_fallback", 0, self.space.fallback_limit(len(ranking)))
            fine_tune = {} if recipe == "pt2e-dynamic" else self._suggest_fine_tune(trial, prefix)
            return QuantPlan(recipe=recipe, fp32_layers=list(ranking[:n_fallback]), **lowering, **fine_tune)
        observer, n_fallback, layer_observers, uses_percentile = self._suggest_ranges(trial, ranking, prefix)
        return QuantPlan(
            recipe=recipe, activation_observer=observer, layer_observers=layer_observers,
            fp32_layers=list(ranking[:n_fallback]),
            calib_samples=trial.suggest_categorical(f"{prefix}calib_samples", tuple(arms.checkpoints)),
            percentile=trial.suggest_categorical(f"{prefix}percentile", PERCENTILES) if uses_percentile else 99.99,
            **lowering,
        )

    def seed_params(self, arms: Arms) -> list[dict]:
        """Trial parameters of PyTorch's default recipes on each allowed engine, x86 first: FX static
        PTQ (get_default_qconfig_mapping), then `quantize_dynamic` (per-tensor weights), for the
        recipes searched; then X86InductorQuantizer's defaults for the PT2E recipes (histogram
        observer, Python wrapper, no bf16).

        The 'measured' kernel choice, if allowed, comes last with the x86 engine's recipe. A choice
        of the default recipe that the space excludes (e.g. channels_last=False in a space that
        only allows True) becomes the space's first allowed value: the seed is as close to
        PyTorch's default as the space allows.
        """
        seeds = []
        several = len(arms.recipes) > 1  # only then is 'recipe' a parameter
        for engine in sorted(self.space.engines, key=lambda e: (e != "x86", e == MEASURED)):
            plan = default_plan("x86" if engine == MEASURED else engine)
            if "static" in arms.recipes:
                seeds.append({
                    **({"recipe": "static"} if several else {}),
                    "activation_observer": _closest(plan.activation_observer, self.space.observers),
                    "n_fallback": 0,
                    **{f"observer:{layer}": GLOBAL for layer in arms.rankings["static"][: self.space.layer_observer_slots]},
                    "engine": engine,
                    "weight_granularity": _closest(plan.weight_granularity, self.space.weight_granularities),
                    "activation_symmetric": _closest(plan.activation_symmetric, self.space.activation_symmetric),
                    "reduce_range": _closest(plan.reduce_range, self.space.reduce_range),  # on AVX2 onednn's
                    # full range comes with 7-bit weights (see _int8_ranges)
                    "calib_samples": arms.checkpoints[-1],
                    "channels_last": _closest(plan.channels_last, self.space.channels_last),
                    **({"fold_relu6": _closest(False, self.space.fold_relu6)} if arms.has_relu6 else {}),
                })
            if "dynamic" in arms.recipes:
                seeds.append({
                    **({"recipe": "dynamic"} if several else {}),
                    "dynamic:n_fallback": 0, "engine": engine,
                    "dynamic:weight_granularity": _closest("per_tensor", self.space.weight_granularities),
                })
        for recipe in (r for r in PT2E_POST_TRAINING if r in arms.recipes):
            prefix = f"{recipe}:"
            seed = {**({"recipe": recipe} if several else {}),
                    f"{prefix}cpp_wrapper": _closest(False, self.space.cpp_wrapper),
                    **self._inductor_range_seed(arms, prefix)}
            if arms.bf16:
                seed[f"{prefix}mixed_bf16"] = _closest(False, self.space.mixed_bf16)
            if recipe == "pt2e-static":
                seed.update({f"{prefix}activation_observer": _closest("histogram", self.space.observers),
                             **{f"{prefix}observer:{layer}": GLOBAL
                                for layer in arms.rankings[recipe][: self.space.layer_observer_slots]},
                             f"{prefix}calib_samples": arms.checkpoints[-1]})
            seeds.append({**seed, f"{prefix}n_fallback": 0})
        return seeds

    def qat_seeds(self, arms: Arms) -> list[dict]:
        """Trial parameters of each QAT recipe searched, at the longest fine-tune (epochs cost tuning time,
        not inference speed), a mid learning rate and no fallbacks: queued only when post-training seeds
        miss the budget (see autoq.tuner).

        Both start from histogram activation ranges, as the post-training seeds. 'qat' is PyTorch's
        default x86 QAT but at full 8-bit activation range (the default's 7-bit range guards CPUs
        without VNNI; the measured accuracy catches any overflow); 'pt2e-qat' is X86InductorQuantizer's
        QAT config with the Python wrapper and no bf16.
        """
        several = len(arms.recipes) > 1
        fine_tune = {"activation_observer": _closest("histogram", self.space.observers), "epochs": self.space.qat_epochs[1],
                     "lr": min(max(1e-4, self.space.qat_lr[0]), self.space.qat_lr[1])}
        seeds = []
        if "qat" in arms.recipes:
            seeds.append({**({"recipe": "qat"} if several else {}), "qat:n_fallback": 0,
                          "engine": _closest("x86", self.space.engines),
                          "qat:weight_granularity": _closest("per_channel", self.space.weight_granularities),
                          "qat:reduce_range": _closest(False, self.space.reduce_range),
                          **{f"qat:{name}": value for name, value in fine_tune.items()}})
        if "pt2e-qat" in arms.recipes:
            seeds.append({**({"recipe": "pt2e-qat"} if several else {}),
                          "pt2e-qat:cpp_wrapper": _closest(False, self.space.cpp_wrapper),
                          **self._inductor_range_seed(arms, "pt2e-qat:"),
                          **({"pt2e-qat:mixed_bf16": _closest(False, self.space.mixed_bf16)} if arms.bf16 else {}),
                          "pt2e-qat:n_fallback": 0,
                          **{f"pt2e-qat:{name}": value for name, value in fine_tune.items()}})
        return seeds

    def _inductor_range_seed(self, arms: Arms, prefix: str) -> dict:
        """X86InductorQuantizer's advice where the CPU lacks VNNI: 7-bit activations (reduce_range)."""
        return {} if arms.full_range_safe(INDUCTOR) else {f"{prefix}reduce_range": _closest(True, self.space.reduce_range)}

    def sweep_params(self, seed: dict, arms: Arms) -> list[dict]:
        """Variations of the best seed: every other observer method, at full 8-bit range if allowed
        (and with ReLU6 folded, which gives its conv outputs a finer grid, if the model has any). On a
        CPU whose kernels saturate, full 8-bit activations come with 7-bit weights (`_int8_ranges`).

        Run right after the seeds, they give the sampler an informed start on the dimensions that
        matter most for accuracy before it spends trials on fallbacks and per-layer choices. For a
        dynamic seed (no observers) the variations are its other weight granularities; for a PT2E
        seed its other lowering options (cpp_wrapper, mixed_bf16) and, if static, observers.
        """
        if "dynamic:weight_granularity" in seed:
            return [{**seed, "dynamic:weight_granularity": granularity} for granularity in self.space.weight_granularities
                    if granularity != seed["dynamic:weight_granularity"]]
        recipe = next((r for r in PT2E_POST_TRAINING if f"{r}:n_fallback" in seed), None)
        if recipe is not None:  # the Inductor lowering options and int8 ranges, then (static) the other observers
            variants = [{**seed, f"{recipe}:{name}": value} for name, values in
                        (("cpp_wrapper", self.space.cpp_wrapper), ("mixed_bf16", self.space.mixed_bf16),
                         ("reduce_range", self.space.reduce_range))
                        if f"{recipe}:{name}" in seed for value in values]
            if recipe == "pt2e-static":
                variants += self._observer_variants(seed, f"{recipe}:")
            return [params for params in _unique(variants) if params != seed]
        preferred = {"reduce_range": False if False in self.space.reduce_range else seed["reduce_range"]}
        if arms.has_relu6 and True in self.space.fold_relu6:  # (where 8-bit outputs would saturate, the plan
            preferred["fold_relu6"] = True              # gets 7-bit weights or is not folded)
        return [params for params in self._observer_variants({**seed, **preferred}, "") if params != seed]

    def _observer_variants(self, seed: dict, prefix: str) -> list[dict]:
        variants = []
        for observer in self.space.observers:
            params = {**seed, f"{prefix}activation_observer": observer}
            if observer == "percentile":
                variants += [{**params, f"{prefix}percentile": percentile} for percentile in PERCENTILES]
            else:
                variants.append(params)
        return variants


def _kernels_of(fields: dict) -> str:
    """The kernel choice (as `_kernel_choice` takes it) of a plan's fields."""
    return MEASURED if fields["dispatch"] == MEASURED else fields["engine"]


def _kernel_choice(kernels: str) -> dict[str, str]:
    """Plan fields of a kernel choice: an engine, or 'measured' per-layer dispatch (from x86's packing)."""
    return {"engine": "x86", "dispatch": MEASURED} if kernels == MEASURED else {"engine": kernels, "dispatch": "engine"}


def _unique(params: list[dict]) -> list[dict]:
    return [p for i, p in enumerate(params) if p not in params[:i]]


def _closest(default: object, allowed: tuple) -> object:
    """`default` if the space allows it, else the space's first allowed value."""
    return default if default in allowed else allowed[0]
