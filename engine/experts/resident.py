"""Experts resident in memory in their store layout: how a quantised model runs when its experts fit.

A quantised model's experts exist only in its (int8 or int4) expert store, never as float parameters of the
layers, so "resident" means every blob read from the store into RAM (or device memory) once, at
load. The layers then compute from views of those blobs: the same bytes and the same kernel as the
offloaded pool uses, so offloading a quantised model changes no result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from engine.experts.store import ExpertStore
from engine.model import ExpertWeights, MoELayerKey
from engine.model.moe import ExpertDemand, MoEFeedForward


class InMemoryExperts:
    """Every expert blob of `store` in one buffer per layer on `device`; an `ExpertProvider`."""

    def __init__(self, store: ExpertStore, *, device: torch.device, progress: bool = True) -> None:
        self.layout = store.layout
        self.blobs: dict[MoELayerKey, torch.Tensor] = {}
        bar = tqdm(
            total=len(store.keys) * store.num_experts, desc="loading experts", unit="expert", disable=not progress
        )
        for key in store.keys:
            layer = torch.empty(store.num_experts, self.layout.nbytes, dtype=torch.uint8, device=device)
            for e in range(store.num_experts):
                layer[e].copy_(store.mapped_blob(key, e))
                bar.update()
            self.blobs[key] = layer
        bar.close()

    @property
    def nbytes(self) -> int:
        return sum(layer.numel() for layer in self.blobs.values())

    def attach(self, layers: Sequence[MoEFeedForward]) -> None:
        for layer in layers:
            layer.expert_provider = self

    def fetch(
        self, layer: MoELayerKey, demand: Sequence[ExpertDemand], hidden_ND: torch.Tensor
    ) -> Iterable[tuple[int, ExpertWeights]]:
        blobs = self.blobs[layer]
        for item in demand:
            yield item.expert, self.layout.unpack(blobs[item.expert])
