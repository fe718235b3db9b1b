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

FEATURES = ("linear", "M", "K", "N", "macs", "outputs", "groups", "depthwise", "kernel_area", "stride",
            "channels_last")
TOLERANCE = 0.05  # a pick within 5% of the faster library's time counts as right
DEPTH = 3  # tree depth: cross-validated on the shipped suite (2: 92%, 3: 93%, 4: 92% held-out)


def shape_features(shape: LayerShape) -> dict[str, float]:
    """Shape features the rule splits on: the per-group GEMM (M, K, N), its size (macs, output
    elements) and conv structure."""
    rows, reduction, columns = shape.gemm()
    return {
        "linear": float(shape.kind == "linear"),
        "M": float(rows),
        "K": float(reduction),
        "N": float(columns),
        "macs": float(rows * reduction * columns * shape.groups),
        "outputs": float(rows * shape.out_channels),
        "groups": float(shape.groups),
        "depthwise": float(shape.kernel_kind() == "depthwise"),
        "kernel_area": float(math.prod(shape.kernel)) if shape.kernel else 1.0,
        "stride": float(max(shape.stride, default=1)),
        "channels_last": float(shape.channels_last),
    }


@dataclass(frozen=True)
class Measurement:
    """Time per call in microseconds of one layer shape under each library, and where it was measured
    ('microbench', 'tuning'; empty when it does not matter). fp32_micros: the same layer in FP32 under
    PyTorch's fastest float kernel, timed beside the libraries (the shape suite measures it; None if not)."""

    shape: LayerShape
    micros: Mapping[str, float]
    source: str = ""
    fp32_micros: float | None = None

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


def fit_rule(measurements: Sequence[Measurement], max_depth: int = DEPTH, min_leaf: int = 3) -> DispatchRule:
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


def fit_with_holdout(measurements: Sequence[Measurement], max_depth: int = DEPTH, splits: int = 20,
                     heldout_fraction: float = 0.3, seed: int = 0) -> DispatchRule:
    """Fit on all shapes; report how rules fitted without a random 30% fare on that 30%.

    The report (`rule.heldout`) averages `splits` random splits: the mean and worst fraction of
    held-out shapes where the pick is within TOLERANCE of the faster library, and the same for
    PyTorch's fixed x86 rule on the same shapes.
    """
    rule = fit_rule(measurements, max_depth=max_depth)
    n_heldout = int(round(heldout_fraction * len(measurements)))
    if n_heldout == 0 or n_heldout == len(measurements):
        return rule
    rng = np.random.default_rng(seed)
    learned, fixed = [], []
    for _ in range(splits):
        order = rng.permutation(len(measurements))
        heldout = [measurements[i] for i in order[:n_heldout]]
        partial = fit_rule([measurements[i] for i in order[n_heldout:]], max_depth=max_depth)
        learned.append(within_tolerance([partial.choose(m.shape) for m in heldout], heldout))
        fixed.append(within_tolerance([x86_rule(m.shape) for m in heldout], heldout))
    rule.heldout = {
        "shapes": n_heldout, "splits": splits, "tolerance": TOLERANCE,
        "within_tolerance": float(np.mean(learned)), "worst_split": float(np.min(learned)),
        "x86_rule": float(np.mean(fixed)),
    }
    return rule
