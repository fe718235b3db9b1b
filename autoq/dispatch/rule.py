"""A learned, readable dispatch rule: which int8 library to use for a layer shape never measured.

The tuned counterpart of PyTorch's fixed x86 rule ("oneDNN iff VNNI and groups <= 100; Linear
always FBGEMM"): a shallow scikit-learn decision tree over GEMM-like shape features, fitted on
microbenchmarks and stored as plain nested thresholds (JSON), not as a pickled estimator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.tree import DecisionTreeClassifier

from autoq.dispatch.layers import LIBRARIES, LayerShape

FEATURES = ("linear", "M", "K", "N", "groups", "kernel_area", "stride", "channels_last")
TOLERANCE = 0.05  # a pick within 5% of the faster library's time counts as right


def shape_features(shape: LayerShape) -> dict[str, float]:
    """Shape features the rule splits on: the per-group GEMM (M, K, N) and conv structure."""
    rows, reduction, columns = shape.gemm()
    return {
        "linear": float(shape.kind == "linear"),
        "M": float(rows),
        "K": float(reduction),
        "N": float(columns),
        "groups": float(shape.groups),
        "kernel_area": float(math.prod(shape.kernel)) if shape.kernel else 1.0,
        "stride": float(max(shape.stride, default=1)),
        "channels_last": float(shape.channels_last),
    }


@dataclass(frozen=True)
class Measurement:
    """Time per call in microseconds of one layer shape under each library."""

    shape: LayerShape
    micros: Mapping[str, float]

    @property
    def fastest(self) -> str:
        return min(self.micros, key=self.micros.__getitem__)

    def regret(self, library: str) -> float:
        """How much slower `library` is than the fastest (0.1 = 10% slower)."""
        return self.micros[library] / self.micros[self.fastest] - 1


@dataclass
class DispatchRule:
    """Nested thresholds: a node is {'feature', 'threshold', 'le', 'gt'} or a leaf {'library'}."""

    tree: dict
    trained_on: int = 0
    heldout: dict = field(default_factory=dict)  # {'shapes', 'within_tolerance', 'tolerance', 'x86_rule'}

    def choose(self, shape: LayerShape) -> str:
        """The library this rule picks for `shape`."""
        features, node = shape_features(shape), self.tree
        while "library" not in node:
            node = node["le"] if features[node["feature"]] <= node["threshold"] else node["gt"]
        return node["library"]

    def text(self) -> str:
        """The rule as indented if/else lines, e.g. 'if groups <= 100: onednn'."""
        lines: list[str] = []
        def walk(node: dict, depth: int) -> None:
            pad = "    " * depth
            if "library" in node:
                lines.append(f"{pad}{node['library']}")
                return
            threshold = f"{node['threshold']:g}"
            lines.append(f"{pad}if {node['feature']} <= {threshold}:")
            walk(node["le"], depth + 1)
            lines.append(f"{pad}else:  # {node['feature']} > {threshold}")
            walk(node["gt"], depth + 1)
        walk(self.tree, 0)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"tree": self.tree, "trained_on": self.trained_on, "heldout": self.heldout, "text": self.text()}

    @classmethod
    def from_dict(cls, data: Mapping) -> DispatchRule:
        return cls(tree=data["tree"], trained_on=int(data.get("trained_on", 0)), heldout=dict(data.get("heldout", {})))


def fit_rule(measurements: Sequence[Measurement], max_depth: int = 3, min_leaf: int = 3) -> DispatchRule:
    """Fit a shallow tree predicting the faster library; each shape weighs by what a wrong pick costs."""
    if not measurements:
        raise ValueError("fit_rule needs at least one measurement.")
    features = np.array([[shape_features(m.shape)[name] for name in FEATURES] for m in measurements])
    labels = np.array([LIBRARIES.index(m.fastest) for m in measurements])
    weights = np.array([max(m.regret(lib) for lib in m.micros) for m in measurements]) + 1e-3
    if len(set(labels)) == 1:
        return DispatchRule({"library": LIBRARIES[labels[0]]}, trained_on=len(measurements))
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_leaf, random_state=0)
    tree.fit(features, labels, sample_weight=weights)
    return DispatchRule(_nested(tree, 0), trained_on=len(measurements))


def _nested(tree: DecisionTreeClassifier, node: int) -> dict:
    """sklearn's arrays as nested dicts; splits whose two sides pick the same library collapse."""
    inner = tree.tree_
    if inner.children_left[node] == inner.children_right[node]:
        return {"library": LIBRARIES[int(tree.classes_[np.argmax(inner.value[node][0])])]}
    low, high = _nested(tree, inner.children_left[node]), _nested(tree, inner.children_right[node])
    if low == high:
        return low
    return {"feature": FEATURES[inner.feature[node]], "threshold": float(inner.threshold[node]), "le": low, "gt": high}


def x86_rule(shape: LayerShape) -> str:
    """PyTorch's fixed x86-engine choice on a VNNI CPU: oneDNN for convs with groups <= 100, else FBGEMM."""
    return "onednn" if shape.kind != "linear" and shape.groups <= 100 else "fbgemm"


def within_tolerance(picks: Sequence[str], measurements: Sequence[Measurement], tolerance: float = TOLERANCE) -> float:
    """Fraction of shapes where the picked library is within `tolerance` of the faster one."""
    if not measurements:
        return float("nan")
    return sum(m.regret(pick) <= tolerance for pick, m in zip(picks, measurements)) / len(measurements)


def fit_with_holdout(measurements: Sequence[Measurement], heldout_fraction: float = 0.3, seed: int = 0,
                     max_depth: int = 3) -> DispatchRule:
    """Fit on all shapes, reporting how a rule fitted without a random held-out part does on that part."""
    order = np.random.default_rng(seed).permutation(len(measurements))
    n_heldout = int(round(heldout_fraction * len(measurements)))
    heldout = [measurements[i] for i in order[:n_heldout]]
    train = [measurements[i] for i in order[n_heldout:]]
    rule = fit_rule(measurements, max_depth=max_depth)
    if heldout and train:
        partial = fit_rule(train, max_depth=max_depth)
        rule.heldout = {
            "shapes": len(heldout),
            "tolerance": TOLERANCE,
            "within_tolerance": within_tolerance([partial.choose(m.shape) for m in heldout], heldout),
            "x86_rule": within_tolerance([x86_rule(m.shape) for m in heldout], heldout),
        }
    return rule
