"""Recording a model's routing on real inputs, for `cpm2 plan --routing`.

The planner draws each MoE layer's experts from what it is told about the routing: how popular each
expert is, how much a request's decode steps return to the experts it chose before (`reuse`), how
alike a request's input tokens route in its encoder pass (`concentration`). Uniform routing, the
default, is the worst case for a cache; a trained model's routing is not uniform, and how far it is
from uniform decides how many experts a budget must hold. `cpm2 generate --record-routing FILE`
records it on the user's own inputs (on any machine that runs the model, or on a smaller model of
the same family) and `cpm2 plan --routing FILE` predicts from it: the same statistics
`bench.plan_validation` checks the planner with.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model import MoELayerKey
from engine.model.moe import ExpertDemand, MoEFeedForward
from engine.planner.routing import RoutingTrace, routing_concentration, routing_reuse

#: The `format` field of a routing file.
ROUTING_FORMAT = "cpm2-routing/1"


class RoutingRecorder:
    """Wraps a model's expert providers to count, per layer, how many tokens each expert got, and to
    keep every layer call in order with the (expert, tokens) pairs it needed (`demands`), from which
    `calls` and `trace` are read. A context manager: leaving it hands the layers their providers back."""

    def __init__(self, layers: Sequence[MoEFeedForward]) -> None:
        self.layers = list(layers)
        self.counts: dict[MoELayerKey, torch.Tensor] = {}
        self.distinct: list[int] = []
        self.demands: list[tuple[str, list[tuple[int, int]]]] = []
        for layer in layers:
            self.counts[layer.key] = torch.zeros(layer.num_experts, dtype=torch.long)
            layer.expert_provider = _Recording(self, layer.expert_provider)

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hand the layers their own providers back."""
        unwrap(self.layers)

    def summary(self, stack: str = "decoder") -> dict[str, Any]:
        """Load balance of the recorded routing (see `routing_summary`)."""
        return routing_summary([c for k, c in self.counts.items() if k.stack == stack], self.distinct)

    def decoder_counts(self) -> dict[str, list[int]]:
        """Tokens per expert of each decoder layer, keyed `decoder.<block>`."""
        return self.stack_counts("decoder")

    def stack_counts(self, stack: str) -> dict[str, list[int]]:
        """Tokens per expert of each layer of `stack`, keyed `<stack>.<block>`."""
        return {str(k): c.tolist() for k, c in self.counts.items() if k.stack == stack}

    @property
    def calls(self) -> list[tuple[str, tuple[int, ...]]]:
        """Each layer call and the experts it needed, in the order of the calls."""
        return [(layer, tuple(sorted(e for e, _ in demand))) for layer, demand in self.demands]

    def trace(self) -> dict[str, list[list[tuple[int, int]]]]:
        """Per layer, its calls' (expert, tokens) pairs in order (`engine.planner.routing.RoutingTrace`)."""
        out: dict[str, list[list[tuple[int, int]]]] = {}
        for layer, demand in self.demands:
            out.setdefault(layer, []).append(demand)
        return out


def routing_summary(counts: Sequence[torch.Tensor], distinct: Sequence[int]) -> dict[str, Any]:
    """Load balance of per-layer expert counts: normalised entropy (1 = uniform) and max/mean load."""
    rows = [c for c in counts if c.sum() > 0]
    if not rows:
        return {}
    entropies, imbalance = [], []
    for row in rows:
        p = row.double() / row.sum()
        nz = p[p > 0]
        entropies.append(float(-(nz * nz.log()).sum() / torch.log(torch.tensor(float(len(p))))))
        imbalance.append(float(row.max() / row.double().mean()))
    return {
        "normalised_entropy_mean": sum(entropies) / len(entropies),
        "max_over_mean_load_mean": sum(imbalance) / len(imbalance),
        "distinct_experts_per_layer_call_mean": sum(distinct) / max(1, len(distinct)),
    }


@dataclass
class _Recording:
    recorder: RoutingRecorder
    inner: Any

    def fetch(self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor) -> Iterator[Any]:
        for item in demand:
            self.recorder.counts[layer][item.expert] += item.num_tokens
        self.recorder.demands.append((str(layer), [(d.expert, d.num_tokens) for d in demand]))
        if layer.stack == "decoder":
            self.recorder.distinct.append(len(demand))
        yield from self.inner.fetch(layer, demand, hidden_ND)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def unwrap(layers: Sequence[MoEFeedForward]) -> None:
    """Hand `layers` their own providers back from any recorder wrapping them."""
    for layer in layers:
        provider = layer.expert_provider
        if isinstance(provider, _Recording):
            layer.expert_provider = provider.inner


@dataclass(frozen=True, kw_only=True)
class RoutingRecord:
    """What `cpm2 plan --routing` takes from a recording (the file `cpm2 generate --record-routing`
    writes): per MoE layer (`decoder.3`), tokens per expert, and the fitted reuse and concentration."""

    popularity: dict[str, list[float]]
    reuse: dict[str, float] = field(default_factory=dict)
    concentration: dict[str, float] = field(default_factory=dict)
    precision: dict[str, float] = field(default_factory=dict)
    """Per MoE layer the provider predicted, the share of its predictions that were right
    (`prediction_precision`); empty where the recording ran without offloading or prefetch."""
    requests: int = 0
    """Requests in the recording (0: unknown, e.g. a file of counts alone)."""
    source: str = ""
    """What was recorded (the model directory)."""

    @classmethod
    def fit(
        cls,
        popularity: Mapping[str, Sequence[float]],
        trace: RoutingTrace,
        *,
        top_k: int,
        requests: int,
        source: str = "",
        precision: Mapping[str, float] | None = None,
    ) -> RoutingRecord:
        """Tokens per expert (`popularity`), and reuse and concentration fitted to `trace` (none
        where it is empty). `requests`: how many requests shared the first call of each encoder
        layer (the concentration's fit reads that call)."""
        counts = {k: [float(x) for x in v] for k, v in popularity.items()}
        return cls(
            popularity=counts,
            reuse=routing_reuse(trace, counts),
            concentration=routing_concentration(trace, counts, top_k=top_k, requests=requests),
            precision=dict(precision or {}),
            requests=requests,
            source=source,
        )

    @classmethod
    def from_recorder(
        cls,
        recorder: RoutingRecorder,
        *,
        top_k: int,
        requests: int,
        source: str,
        precision: Mapping[str, float] | None = None,
    ) -> RoutingRecord:
        """`fit` to what `recorder` saw: its counts and its trace."""
        popularity = {str(k): c.tolist() for k, c in recorder.counts.items()}
        return cls.fit(popularity, recorder.trace(), top_k=top_k, requests=requests, source=source, precision=precision)

    def check(self, config: ModelConfig, *, path: Path) -> None:
        """Refuse a record whose layers or expert counts are not `config`'s (recorded on another model)."""
        moe = config.moe
        if moe is None:
            raise ConfigError(f"--routing {path}: this config has no MoE layers to route")
        layers = moe_layer_names(config)
        for name, per_layer in (
            ("popularity", self.popularity),
            ("reuse", self.reuse),
            ("concentration", self.concentration),
            ("precision", self.precision),
        ):
            for layer in per_layer:
                if layer not in layers:
                    raise ConfigError(
                        f"--routing {path}: {name} names {layer}, not a MoE layer of this config "
                        f"({', '.join(layers)}); record the routing with this model or one of its shape"
                    )
        for layer, share in self.precision.items():
            if not 0 <= share <= 1:
                raise ConfigError(f"--routing {path}: the precision of {layer} is {share}, not a share in [0, 1]")
        for layer, counts in self.popularity.items():
            if len(counts) != moe.num_experts:
                raise ConfigError(
                    f"--routing {path}: {layer} has {len(counts)} experts in the file, this config's layers have "
                    f"{moe.num_experts}; record the routing with this model or one of its shape"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ROUTING_FORMAT,
            "source": self.source,
            "requests": self.requests,
            "popularity": self.popularity,
            "reuse": self.reuse,
            "concentration": self.concentration,
            "precision": self.precision,
        }

    def save(self, path: Path) -> None:
        """Write the record to `path` whole or not at all (a temporary file renamed over it)."""
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise ConfigError(f"--record-routing {path}: could not write it ({error})") from error

    @classmethod
    def load(cls, path: Path) -> RoutingRecord:
        """A routing file: `cpm2 generate --record-routing`'s, or a bare {"decoder.3": [counts]}."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"--routing {path}: not readable JSON ({error})") from error
        if isinstance(data, dict) and "format" in data:
            if data["format"] != ROUTING_FORMAT:
                raise ConfigError(f"--routing {path}: format {data['format']!r}; this cpm2 reads {ROUTING_FORMAT!r}")
            return cls(
                popularity=_per_layer(path, "popularity", data.get("popularity"), list),
                reuse=_per_layer(path, "reuse", data.get("reuse", {}), float),
                concentration=_per_layer(path, "concentration", data.get("concentration", {}), float),
                precision=_per_layer(path, "precision", data.get("precision", {}), float),
                requests=int(data.get("requests", 0)),
                source=str(data.get("source", "")),
            )
        return cls(popularity=_per_layer(path, "popularity", data, list))


def _per_layer(path: Path, name: str, value: object, kind: type) -> Any:
    """`value` checked as {"decoder.3": ...} with lists of counts (`kind` list) or shares (float)."""
    example = '{"decoder.3": [tokens per expert, ...], ...}' if kind is list else '{"decoder.3": 0.4, ...}'
    if not isinstance(value, Mapping):
        raise ConfigError(f"--routing {path}: {name} must be {example}")
    out: dict[str, Any] = {}
    for layer, item in value.items():
        if kind is list:
            ok = isinstance(item, list) and all(_is_count(x) for x in item)
            out[str(layer)] = [float(x) for x in item] if ok else None
        else:
            ok = _is_count(item)
            out[str(layer)] = float(item) if ok else None
        if not ok:
            raise ConfigError(f"--routing {path}: {name}[{layer!r}] must be {example} with finite values >= 0")
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def prediction_precision(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per MoE layer, the share of the provider's predictions of its experts that were right, from
    its per-layer counters (`ExpertStats.layers_to_dict()`, a report's `experts_per_layer`); layers
    it never predicted are left out."""
    return {name: c["predicted_used"] / c["predicted"] for name, c in layers.items() if c.get("predicted")}


def moe_layer_names(config: ModelConfig) -> list[str]:
    """The names routing files and predictions key MoE layers by (`encoder.0`, `decoder.3`), in order."""
    moe = config.moe
    if moe is None:
        return []
    return [f"encoder.{i}" for i in moe.encoder_layers] + [f"decoder.{i}" for i in moe.decoder_layers]
