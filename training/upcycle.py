"""Dense → MoE upcycling: the model surgery of CPM-2-MoE (SEED.md), as a declared key map.

CPM-2-MoE started from the dense bilingual CPM-2: every FFN became an MoE layer whose experts are
exact copies of the dense FFN (`wi_0`, `wi_1`, `wo`), the FFN's pre-norm stays in the block and is
shared by the experts, and the router gets fresh frozen random orthogonal centroids (gain 0.01).
Because CPM-2 routing sends each token to one expert and does not scale its output, and all experts
are equal, the upcycled model computes exactly the dense function at step 0 (tests/test_upcycle.py);
training then lets the copies drift apart. The same map also serves the Switch-style learned router,
whose fresh classifier gets T5's init; its gate scaling means that model starts at a scaled FFN.

`upcycle_key_map` says where every tensor of the MoE model comes from (a dense key, or None for a
fresh router tensor); `upcycle_model` applies it; `training.jobs.export.write_model_dir` writes the
result the way `cpm2 init` does, experts in the engine's expert store.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from engine.config import ModelConfig, MoEConfig, RouterKind, TrainRouting
from engine.errors import ConfigError
from engine.model import Seq2SeqLM
from engine.weights.init import random_tensor

__all__ = ["upcycle_config", "upcycle_key_map", "upcycle_model"]

#: An expert tensor of an MoE layer: its dense source drops the `experts.{e}.` part.
_EXPERT_KEY = re.compile(r"(?P<mlp>(?:encoder|decoder)\.blocks\.\d+\.mlp)\.experts\.\d+\.(?P<name>.+)")
_ROUTER_KEY = re.compile(r"(?:encoder|decoder)\.blocks\.\d+\.mlp\.router\..+")


def upcycle_config(
    dense: ModelConfig,
    *,
    num_experts: int,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    router: RouterKind = "centroid",
    train_routing: TrainRouting = "balanced",
    centroid_gain: float = 0.01,
    aux_loss_coef: float = 0.01,
) -> ModelConfig:
    """The MoE config of `dense` with `num_experts` experts in the listed blocks (None: every block,
    as CPM-2-MoE). Raises ConfigError for a model that already has MoE layers."""
    if dense.moe is not None:
        raise ConfigError("the model to upcycle already has MoE layers; start from a dense model directory")
    moe = MoEConfig(
        num_experts=num_experts,
        router=router,
        encoder_layers=tuple(range(dense.num_encoder_layers) if encoder_layers is None else encoder_layers),
        decoder_layers=tuple(range(dense.num_decoder_layers) if decoder_layers is None else decoder_layers),
        centroid_gain=centroid_gain,
        train_routing=train_routing,
        aux_loss_coef=aux_loss_coef,
    )
    return dense.replace(moe=moe)


def upcycle_key_map(config: ModelConfig) -> dict[str, str | None]:
    """For every tensor of the MoE model `config`, the dense tensor it copies (None: fresh router)."""
    with torch.device("meta"):
        keys = list(Seq2SeqLM(config).state_dict())
    mapping: dict[str, str | None] = {}
    for key in keys:
        expert = _EXPERT_KEY.fullmatch(key)
        if expert is not None:
            mapping[key] = f"{expert['mlp']}.{expert['name']}"
        elif _ROUTER_KEY.fullmatch(key):
            mapping[key] = None
        else:
            mapping[key] = key
    return mapping


def upcycle_model(dense: Seq2SeqLM, config: ModelConfig, *, seed: int = 0) -> Seq2SeqLM:
    """The MoE model `config` built from `dense` by `upcycle_key_map` (copies; `dense` is untouched).

    Fresh router tensors are drawn as `cpm2 init` draws them (`engine.weights.init.random_tensor`:
    centroids = orthogonal_ × `centroid_gain`, seeded by `seed` and the tensor's name), so a resumed
    job rebuilds the same routers. The result has the dense model's device, dtype and train mode.
    """
    dense_state = dense.state_dict()
    reference = next(iter(dense_state.values()))
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    state: dict[str, torch.Tensor] = {}
    for key, source in upcycle_key_map(config).items():
        if source is None:
            shape = model.state_dict()[key].shape
            fresh = random_tensor(config, key, shape, seed=seed)
            state[key] = fresh.to(device=reference.device, dtype=reference.dtype)
        elif source not in dense_state:
            raise ConfigError(f"the dense model has no tensor {source!r} for {key!r}; is it the same architecture?")
        else:
            # A clone per expert: the copies must be independent parameters that train apart.
            state[key] = dense_state[source].detach().clone()
    model.load_state_dict(state, assign=True)
    return model.train(dense.training)
