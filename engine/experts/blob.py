"""Where the parts of one expert lie inside its blob: the byte layout of every expert store format.

An expert's blob holds its matrices in `nn.Linear` layout (out, in), row-major, then what a
quantised format keeps beside them, then its biases, then zero padding to `ALIGNMENT`:

    float:  wi_0 (F, D) | wi_1 (F, D) (gated FFNs only) | wo (D, F) | padding

in the model's storage dtype. An int8 store (`cpm2 quantize --experts int8`) keeps each part as
int8 values with one float32 scale per output row (`engine.model.quant`), the scales after the parts:

    int8:   q(wi_0) | q(wi_1) | q(wo) | scales(wi_0) (F) | scales(wi_1) (F) | scales(wo) (D) | padding

An int4 store (`--experts int4`) keeps each part as packed 4-bit values in the packing the CPU
kernel reads (`engine.model.nibbles`) and a bfloat16 scale and zero per group of G inputs
(`engine.model.int4`), in the same places:

    int4:   packed(wi_0) (F, D/2) | ... | scale_zero(wi_0) (D/G, F, 2) | ... | padding

Quantised blobs run as they are stored whatever the compute dtype: the pool, the link and the
budget carry their bytes. Experts with biases (NLLB-MoE) carry them last, in the store dtype
(float32 in a quantised store):

    ... | bias(wi_0) (F) | bias(wi_1) (F) | bias(wo) (D) | padding
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.model import ExpertWeights
from engine.model.int4 import GROUP_SIZES, Int4Weight, quantize_int4
from engine.model.nibbles import Packing, check_packing, fits
from engine.model.quant import Int8Weight, quantize_int8

#: Every blob starts, and is padded to end, on this boundary (O_DIRECT reads, page-aligned views).
ALIGNMENT = 4096
#: The dtype that names an int4 store (two 4-bit values per byte; the scheme is `INT4_SCHEME`).
INT4 = torch.quint4x2
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int8: "int8",
    INT4: "int4",
}
#: A quantised store's scheme (recorded in every layer file).
INT8_SCHEME = "int8-rowwise-symmetric"
INT4_SCHEME = "int4-groupwise-asymmetric"
_SCALE_ALIGNMENT = 16


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class BlobLayout:
    """Where the parts of one expert lie inside its blob (`dtype` int8 or `INT4`: a quantised store)."""

    d_model: int
    d_ff: int
    is_gated: bool
    dtype: torch.dtype
    has_bias: bool = False
    group_size: int = 0
    """Inputs per scale and zero (int4 stores only)."""
    packing: Packing = "plain"
    """How 4-bit values sit in bytes (int4 stores only)."""

    def __post_init__(self) -> None:
        if not self.is_int4:
            return
        if self.group_size not in GROUP_SIZES:
            raise CheckpointError(f"int4 experts need a group size of {GROUP_SIZES}, not {self.group_size}")
        for rows, cols in self._part_shapes:
            if cols % self.group_size or not fits(self.packing, rows, cols):
                raise CheckpointError(
                    f"int4 experts of ({rows}, {cols}) matrices cannot take group size {self.group_size} "
                    f"and packing {self.packing}"
                )

    @property
    def part_names(self) -> tuple[str, ...]:
        return ("wi_0", "wi_1", "wo") if self.is_gated else ("wi_0", "wo")

    @property
    def bias_dtype(self) -> torch.dtype:
        """Biases stay float (float32 beside int8 values, like the scales)."""
        return torch.float32 if self.is_quantized else self.dtype

    @property
    def _bias_element(self) -> int:
        return torch.empty((), dtype=self.bias_dtype).element_size()

    @property
    def is_quantized(self) -> bool:
        return self.dtype in (torch.int8, INT4)

    @property
    def is_int4(self) -> bool:
        return self.dtype == INT4

    @property
    def part_bytes(self) -> int:
        if self.is_int4:
            return self.d_model * self.d_ff // 2
        return self.d_model * self.d_ff * torch.empty((), dtype=self.dtype).element_size()

    def _meta_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a quantised part's scales (int8: float32 per row; int4: bfloat16 scale and zero
        per group)."""
        return 4 * rows * (cols // self.group_size if self.is_int4 else 1)

    @property
    def _part_shapes(self) -> list[tuple[int, int]]:
        F, D = self.d_ff, self.d_model
        return [(F, D), (F, D), (D, F)] if self.is_gated else [(F, D), (D, F)]

    @property
    def _scales_offset(self) -> int:
        return round_up(self.part_bytes * len(self.part_names), _SCALE_ALIGNMENT)

    @property
    def _matrices_end(self) -> int:
        """Where the weights (and int8 scales) end."""
        if not self.is_quantized:
            return self.part_bytes * len(self.part_names)
        return self._scales_offset + sum(self._meta_bytes(rows, cols) for rows, cols in self._part_shapes)

    @property
    def _bias_offset(self) -> int:
        return round_up(self._matrices_end, _SCALE_ALIGNMENT)

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights (and int8 scales, and biases) in a blob, without the alignment padding."""
        if not self.has_bias:
            return self._matrices_end
        return self._bias_offset + self._bias_element * sum(rows for rows, _ in self._part_shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of a blob, padding included (a multiple of ALIGNMENT)."""
        return round_up(self.payload_bytes, ALIGNMENT)

    @classmethod
    def of(
        cls, config: ModelConfig, dtype: torch.dtype, *, group_size: int | None = None, packing: str | None = None
    ) -> BlobLayout:
        """`config`'s experts stored in `dtype`; an int4 store's group size and packing default to
        the ones `cpm2 quantize` recorded in config.json."""
        int4: dict[str, object] = {}
        if dtype == INT4:
            record = config.extra.get("quantization")
            record = record if isinstance(record, dict) else {}
            if group_size is None and "group_size" not in record:
                raise CheckpointError("int4 experts need their group size (config.json quantization.group_size)")
            int4 = {
                "group_size": int(group_size if group_size is not None else record["group_size"]),
                "packing": check_packing(str(packing if packing is not None else record.get("packing", "plain"))),
            }
        return cls(config.d_model, config.d_ff, config.is_gated_ffn, dtype, has_bias=config.has_ffn_bias, **int4)  # type: ignore[arg-type]

    def for_compute(self, dtype: torch.dtype) -> BlobLayout:
        """The layout these experts take in memory to compute in `dtype`: float ones are converted
        to it, int8 ones compute as they are stored."""
        if self.is_quantized:
            return self
        return BlobLayout(self.d_model, self.d_ff, self.is_gated, dtype, has_bias=self.has_bias)

    def _bias_spans(self) -> list[tuple[int, int]]:
        """(byte offset, bytes) of each part's bias."""
        spans, at = [], self._bias_offset
        for rows, _ in self._part_shapes:
            spans.append((at, self._bias_element * rows))
            at += self._bias_element * rows
        return spans

    def pack(self, weights: ExpertWeights, out: torch.Tensor | None = None) -> torch.Tensor:
        """The blob (uint8, `nbytes`) of an expert given in `nn.Linear` layout (float parts are
        quantised for a quantised layout; parts already in its format are taken as they are)."""
        blob = torch.zeros(self.nbytes, dtype=torch.uint8) if out is None else out
        parts = [weights.wi_0, weights.wi_1, weights.wo] if self.is_gated else [weights.wi_0, weights.wo]
        scale_at = self._scales_offset
        for i, part in enumerate(parts):
            if part is None:
                raise CheckpointError("a gated expert needs wi_0, wi_1 and wo")
            if self.is_int4:
                if isinstance(part, Int8Weight):
                    raise CheckpointError("an int8 expert cannot be written to an int4 store")
                q4 = part if isinstance(part, Int4Weight) else self._quantize_int4(part)
                if (q4.group_size, q4.packing) != (self.group_size, self.packing):
                    raise CheckpointError(
                        f"an int4 expert of group size {q4.group_size} / {q4.packing} packing cannot be written "
                        f"to a store of {self.group_size} / {self.packing}"
                    )
                values = q4.packed
                meta = q4.scale_zero.contiguous().view(-1).view(torch.uint8)
                blob[scale_at : scale_at + meta.numel()].copy_(meta)
                scale_at += meta.numel()
            elif self.is_quantized:
                if isinstance(part, Int4Weight):
                    raise CheckpointError("an int4 expert cannot be written to an int8 store")
                q = part if isinstance(part, Int8Weight) else quantize_int8(part)
                values, scale = q.q, q.scale
                rows = values.shape[0]
                scale_bytes = scale.to(torch.float32).contiguous().view(torch.uint8)
                blob[scale_at : scale_at + 4 * rows].copy_(scale_bytes)
                scale_at += 4 * rows
            else:
                if not isinstance(part, torch.Tensor):
                    raise CheckpointError("a quantised expert cannot be written to a float store; dequantize it first")
                values = part.detach().to(self.dtype)
            flat = values.contiguous().view(-1).view(torch.uint8)
            blob[i * self.part_bytes : (i + 1) * self.part_bytes].copy_(flat)
        if self.has_bias:
            biases = [weights.bi_0, weights.bi_1, weights.bo] if self.is_gated else [weights.bi_0, weights.bo]
            for bias, (at, _) in zip(biases, self._bias_spans(), strict=True):
                if bias is None:
                    raise CheckpointError("an expert of a model with biases needs a bias for every part")
                data = bias.detach().to(self.bias_dtype).contiguous().view(torch.uint8)
                blob[at : at + data.numel()].copy_(data)
        return blob

    def _quantize_int4(self, part: torch.Tensor) -> Int4Weight:
        return quantize_int4(part, group_size=self.group_size, packing=self.packing)

    def unpack(self, blob: torch.Tensor) -> ExpertWeights:
        """Views (no copy) of the parts inside a uint8 blob, on whatever device the blob is."""
        n = self.part_bytes
        shapes = self._part_shapes
        scale_at = [self._scales_offset]
        for rows, cols in shapes[:-1]:
            scale_at.append(scale_at[-1] + self._meta_bytes(rows, cols))

        def part(i: int) -> torch.Tensor | Int8Weight | Int4Weight:
            rows, cols = shapes[i]
            meta = blob[scale_at[i] : scale_at[i] + self._meta_bytes(rows, cols)]
            if self.is_int4:
                packed = blob[i * n : (i + 1) * n].view(rows, cols // 2)
                scale_zero = meta.view(torch.bfloat16).view(cols // self.group_size, rows, 2)
                return Int4Weight(packed, scale_zero, self.group_size, self.packing)
            values = blob[i * n : (i + 1) * n].view(self.dtype).view(shapes[i])
            if not self.is_quantized:
                return values
            return Int8Weight(values, meta.view(torch.float32))

        biases: list[torch.Tensor | None] = [None, None, None]
        if self.has_bias:
            found: list[torch.Tensor | None] = [
                blob[at : at + nbytes].view(self.bias_dtype) for at, nbytes in self._bias_spans()
            ]
            biases = found if self.is_gated else [found[0], None, found[1]]
        if self.is_gated:
            return ExpertWeights(part(0), part(1), part(2), bi_0=biases[0], bi_1=biases[1], bo=biases[2])
        return ExpertWeights(part(0), None, part(1), bi_0=biases[0], bo=biases[2])
