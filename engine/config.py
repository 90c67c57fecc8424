"""Model configuration: one typed, validated description of every model cpm2 runs.

CPM-2 (Zhang et al. 2021, SEED.md), T5 v1.0 / v1.1, mT5 and Switch Transformers are all T5-style
encoder-decoders; they differ in a handful of switches captured here. M2M-100 and NLLB-200 (fairseq's
pre-norm Transformer, HF `modeling_m2m_100.py`) are the same encoder-decoder with other switches:
LayerNorm with bias, projection biases, scaled attention scores, sinusoidal positions and scaled
embeddings. Every switch defaults to T5's behaviour. The config is what
`config.json` of a native model directory holds; `engine.weights.hf` translates Hugging Face configs
into it, so nothing else in the engine ever looks at a foreign config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import ConfigError

Activation = Literal["relu", "gelu_new", "gelu", "silu"]
RouterKind = Literal["centroid", "learned"]
NormKind = Literal["rms", "layer"]
PositionKind = Literal["relative", "sinusoidal"]
TrainRouting = Literal["inference", "balanced", "top1"]

#: Version of the native `config.json` layout; bumped when a field changes meaning.
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Where the Mixture-of-Experts layers are and how tokens are routed to experts."""

    num_experts: int
    """Experts per MoE layer (CPM-2-MoE: 32; switch-base-8: 8)."""
    router: RouterKind
    """`centroid`: CPM-2 / BASE layers, score = RMSNorm(x) @ centroids (frozen), top-1, output not
    scaled by the gate. `learned`: Switch Transformers, a trained linear router in `router_dtype`,
    top-1, expert output scaled by the router probability."""
    encoder_layers: tuple[int, ...]
    """Indices of the encoder blocks whose feed-forward is an MoE layer (others are dense)."""
    decoder_layers: tuple[int, ...]
    """Indices of the decoder blocks whose feed-forward is an MoE layer (others are dense)."""
    expert_capacity: int | None = None
    """Switch: at most this many tokens of one sequence go to one expert, in token order; the
    rest skip the expert (their MoE output is zero), exactly as HF transformers applies it. `None`
    means no limit (CPM-2 inference, SEED.md)."""
    router_bias: bool = False
    """Learned routers (Switch, NLLB-MoE): whether the router has a bias."""
    router_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the learned router runs in (Switch's "selective precision": float32)."""
    centroid_gain: float = 0.01
    """Gain of the random orthogonal centroids drawn at initialisation (CPM-2-MoE upcycling used 0.01)."""
    train_routing: TrainRouting = "inference"
    """How tokens are routed in training mode (`module.training`); inference always routes as
    `router` says. `inference`: training routes exactly like inference, no auxiliary loss.
    `balanced`: CPM-2 / BASE layers (Lewis et al. 2021): every expert gets an equal share of the
    batch's tokens, nothing dropped, total routing score maximised. `top1`: Switch Transformers
    (Fedus et al. 2021): top-1 of the learned router plus the load-balancing loss (needs
    `router: learned`)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss added to the training loss (`train_routing: top1`)."""
    top_k: int = 1
    """Experts per token: 1 (CPM-2, Switch) or 2 (NLLB-MoE, fairseq's `Top2Gate`; needs `router:
    learned`): the argmax of the router probabilities and the argmax of the logits without it, their
    probabilities renormalised to sum to 1 as the two gates (`engine.model.top2`). The fields below
    are top-2 only."""
    normalize_gates_before_capacity: bool = False
    """Top-2: renormalise the two gates before capacity drops an expert (a token that keeps one
    expert keeps its share), not after (it gets gate 1). HF `normalize_router_prob_before_dropping`."""
    batch_prioritized_routing: bool = False
    """Top-2: fill each expert's capacity in order of the tokens' top router probability over the
    whole forward pass, not in token order. HF `batch_prioritized_routing`."""
    eval_capacity_fraction: float | None = 1.0
    """Top-2: at inference each expert takes at most ceil(fraction x tokens in the forward pass)
    first-choice plus second-choice tokens (1.0: nothing is ever dropped); None or <= 0: the
    `expert_capacity` (or 2 x ceil(tokens / experts) without one). HF `moe_eval_capacity_token_fraction`."""
    route_padding: bool = False
    """Top-2: padding tokens take part in routing and take capacity too (their outputs are discarded
    either way). HF `router_ignore_padding_tokens`."""
    expert_output_scale: float = 1.0
    """Factor on every expert's output at inference: 1 - `moe_token_dropout` for NLLB-MoE, as
    transformers computes it (expert output masking is training-only noise, scaled out at eval)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be at least 1, got {self.num_experts}")
        if self.router not in ("centroid", "learned"):
            raise ConfigError(f"moe.router must be 'centroid' or 'learned', got {self.router!r}")
        if self.train_routing not in ("inference", "balanced", "top1"):
            raise ConfigError(
                f"moe.train_routing must be 'inference', 'balanced' or 'top1', got {self.train_routing!r}"
            )
        if self.train_routing == "top1" and self.router != "learned":
            raise ConfigError(
                "moe.train_routing 'top1' trains the router with the load-balancing loss, but the centroid "
                "router is frozen; use router: learned, or train_routing: balanced for centroids"
            )
        if not self.aux_loss_coef >= 0:
            raise ConfigError(f"moe.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        self._check_top_k()
        if self.expert_capacity is not None and self.expert_capacity < 0:
            raise ConfigError(f"moe.expert_capacity must be >= 0 or null (no limit), got {self.expert_capacity}")
        for name in ("encoder_layers", "decoder_layers"):
            layers = getattr(self, name)
            if list(layers) != sorted(set(layers)) or any(i < 0 for i in layers):
                raise ConfigError(
                    f"moe.{name} must be strictly increasing non-negative block indices, got {list(layers)}"
                )

    def _check_top_k(self) -> None:
        if self.top_k not in (1, 2) or isinstance(self.top_k, bool):
            raise ConfigError(f"moe.top_k must be 1 or 2, got {self.top_k!r}")
        if not self.expert_output_scale > 0:
            raise ConfigError(f"moe.expert_output_scale must be > 0, got {self.expert_output_scale}")
        if self.top_k == 1:
            top2_only = {
                "normalize_gates_before_capacity": self.normalize_gates_before_capacity is not False,
                "batch_prioritized_routing": self.batch_prioritized_routing is not False,
                "route_padding": self.route_padding is not False,
            }
            if any(top2_only.values()):
                names = ", ".join(name for name, is_set in top2_only.items() if is_set)
                raise ConfigError(f"moe.{names} applies to top-2 routing only; set moe.top_k 2 or leave it false")
            return
        if self.router != "learned":
            raise ConfigError("moe.top_k 2 needs router: learned (the centroid router picks one expert)")
        if self.train_routing != "inference":
            raise ConfigError(
                f"moe.train_routing {self.train_routing!r} is top-1 routing; top-2 models train with "
                "train_routing: inference"
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and behaviour of a T5-style encoder-decoder (optionally MoE) language model."""

    family: str = "cpm2"
    """Name of the model family (`cpm2`, `t5`, `mt5`, `switch_transformers`, `m2m_100`). Model code never
    reads it; `engine.weights.hf` picks the HF key map by it."""
    vocab_size: int
    """Rows of the input embedding and of the output head."""
    d_model: int
    """Width of the residual stream."""
    num_heads: int
    """Attention heads per attention layer."""
    d_kv: int
    """Width of one attention head (the inner attention width is `num_heads * d_kv`)."""
    d_ff: int
    """Inner width of each feed-forward network (dense FFN and every expert)."""
    num_encoder_layers: int
    """Encoder blocks."""
    num_decoder_layers: int
    """Decoder blocks."""
    activation: Activation = "gelu_new"
    """FFN non-linearity; `gelu_new` is the tanh approximation CPM-2 and T5 v1.1 use."""
    is_gated_ffn: bool = True
    """`wo(act(wi_0 x) * wi_1 x)` (CPM-2, T5 v1.1) instead of `wo(act(wi x))` (T5 v1.0, Switch)."""
    relative_attention_num_buckets: int = 32
    """Buckets of the T5 relative position bias (`position_embedding: relative`)."""
    relative_attention_max_distance: int = 128
    """Distance from which all relative positions share the last bucket (`position_embedding: relative`)."""
    position_embedding: PositionKind = "relative"
    """`relative`: T5's learned relative position bias, added to the attention scores of both stacks'
    self-attention (the table belongs to each stack's first block). `sinusoidal`: fairseq's fixed
    sinusoidal absolute positions added to the input embeddings of both stacks (M2M-100, NLLB-200;
    no parameters and no attention bias). A position counts the non-padding positions of its row up to
    and including it, offset by `pad_token_id`; padding gets position `pad_token_id`, a zero vector
    (HF `M2M100SinusoidalPositionalEmbedding`)."""
    scale_embedding: bool = False
    """Multiply token embeddings by sqrt(d_model) on the way in (M2M-100, NLLB-200). A tied output head
    still uses the unscaled matrix."""
    norm: NormKind = "rms"
    """Kind of every layer norm (each sublayer's pre-norm and each stack's final norm). `rms`: T5's
    RMSNorm, a learned scale and neither mean subtraction nor bias. `layer`: LayerNorm with a learned
    scale and bias (M2M-100, NLLB-200)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the layer norms (T5: 1e-6; M2M-100's `nn.LayerNorm`: 1e-5)."""
    has_attention_bias: bool = False
    """Whether every attention projection (query, key, value, output; self and cross) has a bias
    (M2M-100, NLLB-200). The biases are fused as the weights are: `attn.qkv.bias` = [q; k; v],
    `cross.kv.bias` = [k; v]."""
    has_ffn_bias: bool = False
    """Whether the feed-forward projections (`wi`/`wi_0`/`wi_1`, `wo`) have biases (M2M-100's `fc1`,
    `fc2`), the experts' too (NLLB-MoE)."""
    scale_attention_scores: bool = False
    """Multiply attention scores by 1/sqrt(d_kv) before the softmax (Vaswani et al. 2017; M2M-100,
    NLLB-200). T5 and CPM-2 fold that factor into the initialisation and leave the scores unscaled."""
    tie_word_embeddings: bool = False
    """Reuse the input embedding as the output head (T5 v1.0, Switch). CPM-2 keeps them separate."""
    scale_decoder_output: bool = False
    """Multiply the final decoder state by d_model^-0.5 before the output head (T5 v1.0 and Switch
    with tied embeddings, from Mesh TensorFlow)."""
    pad_token_id: int = 0
    """Padding id; also T5's decoder start token, and the offset of sinusoidal positions."""
    eos_token_id: int = 1
    """End-of-sequence id; generation stops when it is produced."""
    decoder_start_token_id: int = 0
    """First decoder input token (T5: the padding id 0; M2M-100, NLLB-200: `</s>`, 2)."""
    dropout_rate: float = 0.0
    """Dropout after embeddings and every sublayer during training (T5 pre-training used 0.1)."""
    moe: MoEConfig | None = None
    """Mixture-of-Experts layout, or `None` for a dense model."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source architecture, converter version). Never read by model code."""

    def __post_init__(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.activation not in ("relu", "gelu_new", "gelu", "silu"):
            raise ConfigError(f"activation must be one of relu, gelu_new, gelu, silu; got {self.activation!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        self._check_architecture()
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"{name}={token} is outside the vocabulary [0, {self.vocab_size})")
        if self.moe is not None:
            for stack, layers, count in (
                ("encoder", self.moe.encoder_layers, self.num_encoder_layers),
                ("decoder", self.moe.decoder_layers, self.num_decoder_layers),
            ):
                if layers and layers[-1] >= count:
                    raise ConfigError(
                        f"moe.{stack}_layers lists block {layers[-1]} but the {stack} has only {count} "
                        f"blocks (0..{count - 1})"
                    )

    def _check_architecture(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ConfigError(f"norm must be 'rms' (T5 RMSNorm) or 'layer' (LayerNorm with bias), got {self.norm!r}")
        if self.position_embedding not in ("relative", "sinusoidal"):
            raise ConfigError(
                f"position_embedding must be 'relative' (T5 bias) or 'sinusoidal' (fairseq), "
                f"got {self.position_embedding!r}"
            )
        for name in ("scale_embedding", "has_attention_bias", "has_ffn_bias", "scale_attention_scores"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.position_embedding == "sinusoidal" and self.d_model < 4:
            raise ConfigError(
                f"position_embedding 'sinusoidal' needs d_model >= 4 (its frequencies divide by "
                f"d_model // 2 - 1), got d_model {self.d_model}; use a wider model or 'relative'"
            )

    @property
    def inner_dim(self) -> int:
        """Total attention width, `num_heads * d_kv`."""
        return self.num_heads * self.d_kv

    def moe_layers(self, stack: Literal["encoder", "decoder"]) -> tuple[int, ...]:
        """Block indices of `stack` whose feed-forward is an MoE layer."""
        if self.moe is None:
            return ()
        return self.moe.encoder_layers if stack == "encoder" else self.moe.decoder_layers

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to a native model directory's `config.json`."""
        data = dataclasses.asdict(self)
        if self.moe is not None:
            data["moe"]["encoder_layers"] = list(self.moe.encoder_layers)
            data["moe"]["decoder_layers"] = list(self.moe.decoder_layers)
        return {"format": "cpm2", "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Parse the JSON form; unknown or missing fields raise `ConfigError` naming `source`."""
        data = dict(data)
        data.pop("format", None)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: format_version {version} is not supported by this cpm2 "
                f"(it reads version {FORMAT_VERSION}); upgrade cpm2 or re-convert the model"
            )
        moe_data = data.pop("moe", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        try:
            moe = None
            if moe_data is not None:
                moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
                moe_unknown = sorted(set(moe_data) - moe_known)
                if moe_unknown:
                    raise ConfigError(f"{source}: unknown moe field(s) {moe_unknown}")
                moe = MoEConfig(
                    **{
                        **moe_data,
                        "encoder_layers": tuple(moe_data.get("encoder_layers", ())),
                        "decoder_layers": tuple(moe_data.get("decoder_layers", ())),
                    }
                )
            return cls(**data, moe=moe)
        except TypeError as exc:  # a missing required field
            raise ConfigError(f"{source}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write the config as JSON to `path`."""
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read a native `config.json`."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such file") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))
