"""An int8 model's numbers as plain tensors plus a JSON layout, and back into a rebuilt model.

What a tuned model holds beyond its structure: the state dict (int8 weights as quantized tensors,
packed-weight tuples, scales and zero points, FP32 fallback weights) and, in PT2E graphs, the
per-tensor scales and zero points that convert_pt2e writes into the graph as literal arguments.
`numbers(model)` collects both; `encode` turns them into tensors a safetensors file holds (a
quantized tensor becomes its integer values, scales and zero points) and a JSON layout; `restore`
puts them into a model rebuilt from code, refusing anything whose name, type or shape the rebuilt
structure does not have. Nothing here imports, unpickles or evaluates anything from the file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

# packed-weight objects whose __setstate__ only re-packs tensors (what quantized Linear/Conv/LSTM hold)
_PACKED_TYPES = ("__torch__.torch.classes.quantized.", "__torch__.torch.classes.rnn.CellParamsBase")
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_QSCHEMES = {str(q): q for q in (torch.per_tensor_affine, torch.per_tensor_symmetric, torch.per_channel_affine,
                                 torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.qint8, torch.quint8, torch.qint32, torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}


class MismatchError(ValueError):
    """The rebuilt structure does not have a number the file holds (another model or another autoq)."""


@dataclass
class Numbers:
    """state: the model's state dict (entries the graph uses); literals: {'node:arg index': number} of the
    quantize/dequantize calls of PT2E graphs; versions: the state-dict version of each module, which
    quantized modules' loaders read; scalars: the output scale and zero point of each quantized module
    as the module holds them (Python floats, which its state dict rounds to float32: a ReLU6 folded
    by autoq.recipes.fusion has a scale of 6/255 that float32 does not hold, and on MobileNetV2 that
    rounding alone moved the outputs by 17% RMS)."""

    state: dict[str, Any]
    literals: dict[str, float | int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # module prefix -> state-dict format version
    scalars: dict[str, float | int] = field(default_factory=dict)  # 'module.scale' -> the exact Python number


def int8_graph(model: nn.Module) -> nn.Module:
    """The module holding an autoq int8 model's numbers (a compiled PT2E model's reference graph)."""
    graph = getattr(model, "graph", None)
    return graph if isinstance(graph, fx.GraphModule) and not isinstance(model, fx.GraphModule) else model


def numbers(model: nn.Module) -> Numbers:
    """What `model` computes with beyond its structure (see the module docstring)."""
    module = int8_graph(model)
    full = module.state_dict(keep_vars=False)
    versions = {prefix: int(data["version"]) for prefix, data in getattr(full, "_metadata", {}).items()
                if isinstance(data.get("version"), int)}
    state = dict(full)
    literals: dict[str, float | int] = {}
    if isinstance(module, fx.GraphModule):
        used = {node.target for node in module.graph.nodes if node.op in ("get_attr", "call_module")}
        state = {key: value for key, value in state.items()
                 if key in used or any(key.startswith(f"{target}.") for target in used)}
        for node in _quantize_calls(module):
            for index, value in enumerate(node.args):
                if isinstance(value, (float, int)) and not isinstance(value, bool):
                    literals[f"{node.name}:{index}"] = value
    scalars = {f"{name}.{attribute}": getattr(child, attribute) for name, child in module.named_modules()
               if type(child).__module__.startswith(_QUANTIZED_MODULES) for attribute in ("scale", "zero_point")
               if isinstance(getattr(child, attribute, None), (float, int))}
    return Numbers(state, literals, versions, scalars)


def _quantize_calls(module: fx.GraphModule) -> list[fx.Node]:
    return [node for node in module.graph.nodes
            if node.op == "call_function" and "quantized_decomposed" in str(getattr(node.target, "namespace", ""))]


def encode(values: Numbers) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for a safetensors file, JSON layout) of `values`."""
    tensors: dict[str, torch.Tensor] = {}
    layout = {"state": {key: _encode(value, key, tensors) for key, value in values.state.items()},
              "literals": dict(values.literals), "versions": dict(values.versions), "scalars": dict(values.scalars)}
    return tensors, layout


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_quantized:
            entry = {"kind": "qtensor", "dtype": str(value.dtype).removeprefix("torch."),
                     "qscheme": str(value.qscheme())}
            tensors[f"{name}.int"] = value.int_repr().contiguous()
            if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                entry.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
            else:
                tensors[f"{name}.scales"] = value.q_per_channel_scales().contiguous()
                tensors[f"{name}.zero_points"] = value.q_per_channel_zero_points().contiguous()
                entry["axis"] = int(value.q_per_channel_axis())
            return entry
        tensors[name] = value.contiguous()
        return {"kind": "tensor"}
    if isinstance(value, (tuple, list)):
        return {"kind": type(value).__name__, "items": [_encode(item, f"{name}.{i}", tensors)
                                                        for i, item in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "value": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"kind": "literal", "value": value}
    if isinstance(value, torch.ScriptObject) and _packed_type(value):
        return {"kind": "packed", "type": _packed_type(value), "state": _encode(value.__getstate__(), name, tensors)}
    raise TypeError(f"autoq cannot store state entry {name!r} of type {type(value).__name__} as data.")


def _packed_type(value: torch.ScriptObject) -> str | None:
    name = value._type().qualified_name()
    return name if name.startswith(_PACKED_TYPES) else None


def restore(model: nn.Module, tensors: Mapping[str, torch.Tensor], layout: Mapping) -> None:
    """Put the numbers of (tensors, layout) into `model`, rebuilt from code for the same plan (in place).

    Raises MismatchError naming the first entry the rebuilt structure does not have, or has with
    another type or shape."""
    module = int8_graph(model)
    rebuilt = numbers(model)
    stored, literals = dict(layout["state"]), dict(layout["literals"])
    if set(stored) != set(rebuilt.state):
        missing, extra = sorted(set(rebuilt.state) - set(stored)), sorted(set(stored) - set(rebuilt.state))
        raise MismatchError(f"the rebuilt model has state entries the file lacks {missing[:3]} or the file has "
                            f"entries the rebuilt model lacks {extra[:3]}")
    if set(literals) != set(rebuilt.literals):
        raise MismatchError(f"the rebuilt graph's quantize calls differ from the file's "
                            f"({sorted(set(literals) ^ set(rebuilt.literals))[:3]})")
    if set(layout["scalars"]) != set(rebuilt.scalars):
        raise MismatchError(f"the rebuilt model's quantized modules differ from the file's "
                            f"({sorted(set(layout['scalars']) ^ set(rebuilt.scalars))[:3]})")
    state = OrderedDict((key, _decode(entry, key, tensors, rebuilt.state[key])) for key, entry in stored.items())
    state._metadata = {prefix: {"version": int(version)} for prefix, version in layout["versions"].items()}
    module.load_state_dict(state, strict=False)
    for key, value in layout["scalars"].items():
        owner, attribute = key.rsplit(".", 1)
        setattr(module.get_submodule(owner), attribute, _same(value, rebuilt.scalars[key], key))
    if literals:
        nodes = {node.name: node for node in _quantize_calls(module)}
        for key, value in literals.items():
            name, index = key.rsplit(":", 1)
            node = nodes[name]
            if type(node.args[int(index)]) is not type(value):
                raise MismatchError(f"argument {index} of {name} is a {type(node.args[int(index)]).__name__} in the "
                                    f"rebuilt graph, a {type(value).__name__} in the file")
            node.args = tuple(value if i == int(index) else arg for i, arg in enumerate(node.args))
        module.recompile()


def _decode(entry: Mapping, name: str, tensors: Mapping[str, torch.Tensor], template: Any) -> Any:
    kind = entry["kind"]
    if kind == "tensor":
        return _checked(tensors[name], template, name)
    if kind == "qtensor":
        values = tensors[f"{name}.int"]
        dtype, qscheme = _DTYPES[entry["dtype"]], _QSCHEMES[entry["qscheme"]]
        if "axis" in entry:
            quantized = torch._make_per_channel_quantized_tensor(
                values, tensors[f"{name}.scales"], tensors[f"{name}.zero_points"], int(entry["axis"]))
        else:
            quantized = torch._make_per_tensor_quantized_tensor(values, float(entry["scale"]),
                                                                int(entry["zero_point"]))
        if quantized.dtype != dtype or quantized.qscheme() != _canonical(qscheme):
            raise MismatchError(f"{name}: stored as {entry['dtype']} {entry['qscheme']}, decoded as "
                                f"{quantized.dtype} {quantized.qscheme()}")
        return _checked(quantized, template, name)
    if kind in ("tuple", "list"):
        if not isinstance(template, (tuple, list)) or len(template) != len(entry["items"]):
            raise MismatchError(f"{name}: the file holds {len(entry['items'])} items, the rebuilt model "
                                f"{type(template).__name__}")
        items = [_decode(item, f"{name}.{i}", tensors, template[i]) for i, item in enumerate(entry["items"])]
        return tuple(items) if kind == "tuple" else items
    if kind == "dtype":
        return _same(_DTYPES[entry["value"]], template, name)
    if kind == "literal":
        return _same(entry["value"], template, name)
    if kind == "packed":
        if not isinstance(template, torch.ScriptObject) or _packed_type(template) != entry["type"]:
            raise MismatchError(f"{name}: the file holds packed weights {entry['type']}, the rebuilt model "
                                f"{type(template).__name__}")
        state = _decode(entry["state"], name, tensors, template.__getstate__())
        if state[-1] != entry["type"]:  # (payload, class name): __setstate__ builds that class
            raise MismatchError(f"{name}: packed weights of class {state[-1]!r}, expected {entry['type']!r}")
        packed = torch.ScriptObject.__new__(torch.ScriptObject)  # as pickle does: a fresh object, then its state
        packed.__setstate__(state)
        return packed
    raise MismatchError(f"{name}: unknown entry kind {kind!r} (a newer autoq wrote this file?)")


def _canonical(qscheme: torch.qscheme) -> torch.qscheme:
    """The qscheme a tensor made from values + qparams reports (symmetric is affine at zero point 0)."""
    return {torch.per_tensor_symmetric: torch.per_tensor_affine,
            torch.per_channel_symmetric: torch.per_channel_affine}.get(qscheme, qscheme)


def _checked(value: torch.Tensor, template: Any, name: str) -> torch.Tensor:
    if not isinstance(template, torch.Tensor) or value.shape != template.shape or (
            value.dtype != template.dtype and not (value.is_quantized and template.is_quantized)):
        described = (f"{template.dtype} {tuple(template.shape)}" if isinstance(template, torch.Tensor)
                     else type(template).__name__)
        raise MismatchError(f"{name}: the file holds {value.dtype} {tuple(value.shape)}, the rebuilt model "
                            f"{described}")
    return value


def _same(value: Any, template: Any, name: str) -> Any:
    if type(value) is not type(template) or (isinstance(value, torch.dtype) and value != template):
        raise MismatchError(f"{name}: the file holds {value!r}, the rebuilt model {template!r}")
    return value
