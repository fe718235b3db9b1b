"""Dispatch tables: per-layer int8 library choices measured on one CPU, as versioned JSON.

A table holds the CPU identity it was measured on, the torch version, exact per-signature
measurements (from `autoq dispatch bench` or from tuning runs) and a learned rule for shapes it
has never seen. On the CPU it was measured on, exact entries win; on another CPU the table warns
and uses only its rule.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from autoq.dispatch.layers import LIBRARIES, LayerShape
from autoq.dispatch.rule import DEPTH, DispatchRule, Measurement, fit_with_holdout, x86_rule
from autoq.files import write_atomic

TABLE_TYPE = "autoq.DispatchTable"
TABLE_VERSION = 1
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuIdentity:
    """What makes kernel timings transferable: vendor, model name and the int8-relevant ISA flags."""

    vendor: str
    model: str
    flags: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.model} ({self.vendor}; {' '.join(self.flags) or 'no listed ISA flags'})"


def current_cpu() -> CpuIdentity:
    """This machine's CPU identity, from /proc/cpuinfo (platform.processor() elsewhere)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if not line.strip() and info:
                break
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return CpuIdentity(
        vendor=info.get("vendor_id", platform.machine()),
        model=info.get("model name", platform.processor() or "unknown"),
        flags=tuple(flag for flag in ISA_FLAGS if flag in flags),
    )


@dataclass
class DispatchTable:
    """Per-signature library choices for one CPU, plus a learned rule for unseen shapes."""

    cpu: CpuIdentity
    torch_version: str
    threads: int
    entries: dict[str, Measurement] = field(default_factory=dict)
    rule: DispatchRule | None = None
    created: str = ""

    @classmethod
    def for_this_machine(cls, entries: Iterable[Measurement] = ()) -> DispatchTable:
        """An empty (or pre-filled) table stamped with this CPU, torch version and thread count."""
        table = cls(current_cpu(), str(torch.__version__), torch.get_num_threads(),
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        table.add(entries)
        return table

    def add(self, entries: Iterable[Measurement]) -> None:
        """Add or replace entries by signature."""
        for entry in entries:
            self.entries[entry.shape.key()] = entry

    def refit(self, max_depth: int = DEPTH) -> DispatchRule:
        """Learn the rule from all entries (with a held-out report) and keep it."""
        self.rule = fit_with_holdout(list(self.entries.values()), max_depth=max_depth)
        return self.rule

    def matches_this_machine(self) -> bool:
        return self.cpu == current_cpu()

    def choose(self, shape: LayerShape, *, exact: bool = True) -> tuple[str, str]:
        """(library, why) for `shape`: the exact measured entry, else the rule, else PyTorch's x86 rule."""
        entry = self.entries.get(shape.key()) if exact else None
        if entry is not None:
            return entry.fastest, "measured"
        if self.rule is not None:
            return self.rule.choose(shape), "rule"
        return x86_rule(shape), "x86 default"

    def choose_all(self, shapes: Mapping[str, LayerShape]) -> dict[str, str]:
        """Library per layer for a model's layer shapes; warns when the table is from another CPU."""
        exact = self.matches_this_machine()
        if not exact:
            here = current_cpu()
            warnings.warn(
                f"autoq dispatch table was measured on {self.cpu.describe()}, but this CPU is "
                f"{here.describe()}: its exact timings do not transfer, so every layer uses the table's "
                f"learned rule{'' if self.rule else ' (it has none: PyTorch x86 default)'}. Build a table "
                f"for this CPU with `autoq dispatch bench`.",
                stacklevel=2,
            )
        elif self.threads != torch.get_num_threads():
            warnings.warn(
                f"autoq dispatch table was measured with {self.threads} threads; running with "
                f"{torch.get_num_threads()}: its choices may not be the fastest here.", stacklevel=2)
        return {name: self.choose(shape, exact=exact)[0] for name, shape in shapes.items()}

    def to_dict(self) -> dict:
        return {
            "_type": TABLE_TYPE,
            "_version": TABLE_VERSION,
            "cpu": {"vendor": self.cpu.vendor, "model": self.cpu.model, "flags": list(self.cpu.flags)},
            "torch_version": self.torch_version,
            "threads": self.threads,
            "created": self.created,
            "libraries": list(LIBRARIES),
            "rule": self.rule.to_dict() if self.rule else None,
            "entries": [
                {"key": key, "library": entry.fastest, "micros": dict(entry.micros), "source": entry.source,
                 "shape": entry.shape.to_dict(),
                 **({"fp32_micros": entry.fp32_micros} if entry.fp32_micros is not None else {})}
                for key, entry in sorted(self.entries.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> DispatchTable:
        if not isinstance(data, Mapping) or data.get("_type") != TABLE_TYPE:
            raise ValueError(f"Not an autoq dispatch table (expected '_type': {TABLE_TYPE!r}).")
        if data.get("_version") != TABLE_VERSION:
            raise ValueError(
                f"autoq dispatch table version {data.get('_version')!r} is not supported (this autoq reads "
                f"version {TABLE_VERSION}); rebuild it with `autoq dispatch bench`."
            )
        cpu = data["cpu"]
        table = cls(
            CpuIdentity(cpu["vendor"], cpu["model"], tuple(cpu["flags"])), data["torch_version"],
            int(data["threads"]), rule=DispatchRule.from_dict(data["rule"]) if data.get("rule") else None,
            created=data.get("created", ""),
        )
        table.add(Measurement(LayerShape.from_dict(e["shape"]), dict(e["micros"]), e["source"], e.get("fp32_micros"))
                  for e in data["entries"])
        return table

    def int8_over_fp32(self) -> dict[str, tuple[float, float, float, int]]:
        """Where int8 pays on this table's CPU: per kernel kind ('linear', 'conv', 'depthwise'), FP32 time over
        the faster int8 library's time (>1: int8 is faster) as (geometric mean, lowest, highest, shapes), over
        the entries timed in FP32 too (`autoq dispatch bench`). Layers alone, quantize/dequantize not counted."""
        ratios: dict[str, list[float]] = {}
        for entry in self.entries.values():
            if entry.fp32_micros is not None:
                ratios.setdefault(entry.shape.kernel_kind(), []).append(
                    entry.fp32_micros / entry.micros[entry.fastest])
        return {kind: (math.exp(sum(map(math.log, values)) / len(values)), min(values), max(values), len(values))
                for kind, values in sorted(ratios.items())}

    @classmethod
    def resolve(cls, table: DispatchTable | str | os.PathLike) -> DispatchTable:
        """A table given as itself, as a JSON path, or as 'shipped' (autoq's table for this CPU)."""
        if isinstance(table, DispatchTable):
            return table
        if table == "shipped":
            shipped = shipped_table()
            if shipped is None:
                raise ValueError("autoq ships no dispatch table for this CPU; build one with `autoq dispatch "
                                 "bench --out table.json` and use 'table.json' instead.")
            return shipped
        if isinstance(table, (str, os.PathLike)):
            return cls.load(table)
        raise TypeError(f"A dispatch table must be a DispatchTable, a JSON path or 'shipped'. "
                        f"Got {type(table).__name__}.")

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DispatchTable:
        """Read a table written by `save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read dispatch table {os.fspath(path)!r}: {error}") from error
        return cls.from_dict(data)


def shipped_tables() -> list[Path]:
    """Dispatch tables shipped with autoq (package data `autoq.kernels/tables/*.json`)."""
    folder = resources.files("autoq.kernels") / "tables"
    return sorted(Path(str(item)) for item in folder.iterdir() if item.name.endswith(".json")) if folder.is_dir() else []


def shipped_table() -> DispatchTable | None:
    """The shipped table measured on this machine's CPU, if autoq ships one."""
    for path in shipped_tables():
        table = DispatchTable.load(path)
        if table.matches_this_machine():
            return table
    return None
