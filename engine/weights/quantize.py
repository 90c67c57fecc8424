"""`cpm2 quantize --model DIR --out DIR --experts int8|int4 [--group-size N] [--dense int8]`.

The source streams through one tensor at a time (`native_tensors`): dense tensors go unchanged into
bounded shards, expert weights are quantised (int8 per output row, `engine.model.quant`; int4 per
group of inputs, `engine.model.int4`) into a quantised expert store (`engine.experts.store`), so
memory holds one tensor and one blob, never a layer of experts more. Int4 values are packed in the
layout this machine's int4 kernel reads (`--packing auto`), or one named for another machine.
The new directory is built under a temporary name beside `--out` and renamed into place only when
it is complete and checked: a failure, or bad input, writes nothing.

`--dense int8` records that the dense matmuls (every linear layer but the experts', and the output
head) run in int8: they are quantised when the model is loaded (`quantize_dense`), as CTranslate2
does for a float model asked for int8, so the shards stay float on disk.

What the quantisation cost is reported, and kept as `quantization_report.json` in the directory:
the max / mean absolute error of every expert tensor, and on a few inputs the largest logit
difference and the share of positions whose top-1 token is unchanged between the source model and
the quantised one (teacher-forced on the source's own greedy output).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.config import ModelConfig
from engine.errors import CheckpointError, ConfigError
from engine.experts.blob import INT4, INT4_SCHEME, INT8_SCHEME
from engine.experts.store import STORE_DIR, ExpertStoreWriter, is_expert_key
from engine.model import Seq2SeqLM
from engine.model.int4 import DEFAULT_GROUP_SIZE, Int4Weight, check_group_size, quantize_int4
from engine.model.kernels import active_kernels
from engine.model.linear import Linear
from engine.model.nibbles import PACKINGS, Packing, fits
from engine.model.quant import Int8Weight, quantize_int8
from engine.weights.convert import CARRIED_FILES
from engine.weights.files import DEFAULT_MAX_SHARD_BYTES, ShardWriter, open_tensor_source
from engine.weights.loader import CONFIG_FILE, inspect_checkpoint, native_tensors

#: Formats `--experts` and `--dense` take.
EXPERT_FORMATS = ("int8", "int4")
DENSE_FORMATS = ("int8",)
#: `--packing`: `auto` is the layout this machine's int4 kernel reads where the expert shapes allow.
PACKING_CHOICES = ("auto", *PACKINGS)
REPORT_FILE = "quantization_report.json"
#: Directories carried over unchanged (a model's bundled soft prompts are trained for its embeddings,
#: which quantising the experts leaves as they are).
CARRIED_DIRS = ("prompts",)


#: The expert store dtype of each `--experts` format.
_STORE_DTYPES = {"int8": torch.int8, "int4": INT4}
#: Where a model directory's config.json records what `cpm2 quantize` quantised.
QUANTIZATION_KEY = "quantization"


def _quantized(config: ModelConfig, part: str) -> str | None:
    record = config.extra.get(QUANTIZATION_KEY)
    return str(record.get(part)) if isinstance(record, dict) and record.get(part) else None


def quantized_experts(config: ModelConfig) -> str | None:
    """The format a model's experts were quantised to (`"int8"`), None for float experts."""
    return _quantized(config, "experts")


def expert_store_dtype(config: ModelConfig) -> torch.dtype | None:
    """The dtype of a quantised model's expert store (`torch.int8`, `INT4`), None for float experts."""
    return _STORE_DTYPES.get(quantized_experts(config) or "")


def quantized_dense(config: ModelConfig) -> str | None:
    """The format a model's dense weights run in (`"int8"`: quantised when loaded), None for float."""
    return _quantized(config, "dense")


@dataclass(frozen=True)
class ExpertFormat:
    """How expert matrices are stored: quantised to `experts` (int8 per output row; int4 in groups
    of `group_size` inputs, packed as `packing`). `cpm2 quantize` and `cpm2 init` both write it."""

    experts: str
    group_size: int | None = None
    packing: Packing | None = None

    @classmethod
    def choose(
        cls, config: ModelConfig, experts: str, *, group_size: int | None = None, packing: str = "auto"
    ) -> ExpertFormat:
        """The format `experts` takes for `config`'s expert shapes; ConfigError for what cannot be."""
        if experts not in EXPERT_FORMATS:
            raise ConfigError(f"--experts {experts}: unknown format; supported: {', '.join(EXPERT_FORMATS)}")
        if config.moe is None:
            raise ConfigError("a dense model has no experts to quantise; leave --experts out")
        check_int4_options(experts, group_size, packing)
        if experts != "int4":
            return cls(experts)
        return cls(experts, *_int4_format(config, group_size or DEFAULT_GROUP_SIZE, packing))

    @property
    def store_dtype(self) -> torch.dtype:
        return _STORE_DTYPES[self.experts]

    @property
    def scheme(self) -> str:
        return INT4_SCHEME if self.experts == "int4" else INT8_SCHEME

    def quantize(self, weight: torch.Tensor) -> Int8Weight | Int4Weight:
        """One expert matrix in this format."""
        if self.experts == "int4":
            assert self.group_size is not None
            assert self.packing is not None
            return quantize_int4(weight, group_size=self.group_size, packing=self.packing)
        return quantize_int8(weight)

    def record(self) -> dict[str, Any]:
        """What config.json's quantization record says of the experts."""
        record: dict[str, Any] = {"experts": self.experts, "scheme": self.scheme}
        if self.group_size is not None:
            record.update(group_size=self.group_size, packing=self.packing)
        return record


def check_int4_options(experts: str | None, group_size: int | None, packing: str) -> None:
    """Refuse a `--group-size` or `--packing` that int4 experts do not take, or that are not int4's."""
    if packing not in PACKING_CHOICES:
        raise ConfigError(f"--packing {packing}: unknown; supported: {', '.join(PACKING_CHOICES)}")
    if experts != "int4" and (group_size is not None or packing != "auto"):
        raise ConfigError("--group-size and --packing apply to --experts int4 only; leave them out")
    if group_size is not None:
        try:
            check_group_size(group_size)
        except ValueError as error:
            raise ConfigError(f"--group-size: {error}") from None


def dense_record(dense: str) -> dict[str, Any]:
    """What config.json's quantization record says of dense weights run in `dense` (int8)."""
    if dense not in DENSE_FORMATS:
        raise ConfigError(f"--dense {dense}: unknown format; supported: {', '.join(DENSE_FORMATS)}")
    return {"dense": dense, "dense_scheme": INT8_SCHEME}


@dataclass(frozen=True)
class TensorError:
    """How far one quantised tensor is from its source."""

    name: str
    max_abs: float
    mean_abs: float


@dataclass
class QuantizeReport:
    source: str
    experts: str | None
    scheme: str
    dense: str | None = None
    group_size: int | None = None
    packing: str | None = None
    expert_bytes_before: int = 0
    expert_bytes_after: int = 0
    tensors: list[TensorError] = field(default_factory=list)
    num_inputs: int = 0
    logit_max_abs_diff: float | None = None
    top1_agreement: float | None = None
    """Share of checked positions whose most likely token is the same for both models."""

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def mean_abs(self) -> float:
        return sum(t.mean_abs for t in self.tensors) / len(self.tensors) if self.tensors else 0.0

    def lines(self) -> list[str]:
        worst = max(self.tensors, key=lambda t: t.max_abs, default=None)
        int4 = f", groups of {self.group_size}, {self.packing} packing" if self.group_size else ""
        lines = [
            f"experts: {self.experts or 'as stored'}{int4}, dense: {self.dense or 'as stored'} ({self.scheme}), "
            f"{len(self.tensors)} tensors quantised, experts {self.expert_bytes_before:,} -> "
            f"{self.expert_bytes_after:,} bytes",
            f"weight error: max abs {self.max_abs:.3g}"
            + (f" ({worst.name})" if worst is not None else "")
            + f", mean abs {self.mean_abs:.3g}",
        ]
        if self.top1_agreement is not None:
            lines.append(
                f"on {self.num_inputs} inputs: logits max abs diff {self.logit_max_abs_diff:.3g}, "
                f"top-1 agreement {100 * self.top1_agreement:.1f} %"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs": self.max_abs, "mean_abs": self.mean_abs}


def _check_request(
    src: Path, dst: Path, experts: str | None, dense: str | None, group_size: int | None, packing: str
) -> None:
    if experts is None and dense is None:
        raise ConfigError("nothing to quantise: give --experts int8|int4, --dense int8 or both")
    check_int4_options(experts, group_size, packing)
    if dense is not None:
        dense_record(dense)  # refuses an unknown format before anything is read
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new --out directory")
    if dst.resolve() == src.resolve():
        raise ConfigError("--out must be a new directory, not the source model")


def quantize_model(
    src: Path | str,
    dst: Path | str,
    *,
    experts: str | None = "int8",
    dense: str | None = None,
    group_size: int | None = None,
    packing: str = "auto",
    check_inputs: int = 4,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> QuantizeReport:
    """Write `dst`: `src` with its experts quantised to `experts` (int4: in groups of `group_size`
    inputs, packed as `packing`); returns (and saves) the report."""
    src, dst = Path(src), Path(dst)
    _check_request(src, dst, experts, dense, group_size, packing)
    files = open_tensor_source(src)
    try:
        info = inspect_checkpoint(src, files)
        config = info.config
        if experts is not None and quantized_experts(config) is not None:
            raise ConfigError(f"{src}: its experts are already quantised ({quantized_experts(config)})")
        if dense is not None and quantized_dense(config) is not None:
            raise ConfigError(f"{src}: its dense weights are already quantised ({quantized_dense(config)})")
        try:
            fmt = (
                None
                if experts is None
                else ExpertFormat.choose(config, experts, group_size=group_size, packing=packing)
            )
        except ConfigError as error:
            raise ConfigError(f"{src}: {error}") from None
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            report = _write(
                info,
                files,
                work,
                fmt=fmt,
                dense=dense,
                max_shard_bytes=max_shard_bytes,
                progress=progress,
            )
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        files.close()
    try:
        previous = config.extra.get(QUANTIZATION_KEY)
        record = {**(previous if isinstance(previous, dict) else {}), "source": str(src)}
        if fmt is not None:
            record.update(fmt.record())
        if dense is not None:
            record.update(dense_record(dense))
        config.replace(extra={**config.extra, QUANTIZATION_KEY: record}).save(work / CONFIG_FILE)
        _carry(src, work)
        if check_inputs > 0:
            _compare(src, work, report, num_inputs=check_inputs)
        (work / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _int4_format(config: ModelConfig, group_size: int, packing: str) -> tuple[int, Packing]:
    """The group size and packing int4 experts of `config` take; ConfigError when its matrices cannot."""
    shapes = [(config.d_ff, config.d_model), (config.d_model, config.d_ff)]
    for _, cols in shapes:
        try:
            check_group_size(group_size, cols)
        except ValueError as error:
            raise ConfigError(f"--group-size {group_size}: {error}") from None
    if packing == "auto":
        # This machine's kernel layout where every expert matrix fits it, else the portable one.
        native = active_kernels().int4_packing
        return group_size, native if native and all(fits(native, r, c) for r, c in shapes) else "plain"
    if not all(fits(packing, r, c) for r, c in shapes):
        raise ConfigError(
            f"--packing {packing}: expert matrices of {config.d_model} x {config.d_ff} do not fit it "
            "(its row blocks must divide d_model and d_ff); use --packing plain"
        )
    return group_size, packing  # type: ignore[return-value]


def _dense_linear_keys(config: ModelConfig) -> set[str]:
    """The weights `--dense int8` runs in int8: every `Linear`'s but the experts'."""
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear) and ".experts." not in name}


def _write(
    info: Any,
    files: Any,
    out: Path,
    *,
    fmt: ExpertFormat | None,
    dense: str | None,
    max_shard_bytes: int,
    progress: bool,
) -> QuantizeReport:
    report = QuantizeReport(
        source=str(info.path),
        experts=fmt.experts if fmt else None,
        dense=dense,
        scheme=fmt.scheme if fmt else INT8_SCHEME,
        group_size=fmt.group_size if fmt else None,
        packing=fmt.packing if fmt else None,
    )
    shards = ShardWriter(out, max_shard_bytes=max_shard_bytes, metadata={"producer": "cpm2 quantize"})
    # Experts already quantised are carried over byte for byte; float ones kept as they are go into
    # a float store as before.
    carried = fmt is None and quantized_experts(info.config) is not None
    if carried:
        shutil.copytree(info.path / STORE_DIR, out / STORE_DIR)
    store = None
    if info.config.moe is not None and not carried:
        dtype = fmt.store_dtype if fmt else info.stored_dtype
        store = ExpertStoreWriter(
            out, info.config, dtype, group_size=fmt.group_size if fmt else None, packing=fmt.packing if fmt else None
        )
    dense_keys = _dense_linear_keys(info.config) if dense else set()
    tensors = native_tensors(
        info, files, dtype=info.stored_dtype, device=torch.device("cpu"), include_experts=not carried
    )
    for key, tensor in tqdm(tensors, desc="quantizing", unit="tensor", disable=not progress):
        # Expert biases (NLLB-MoE) stay float beside the quantised values, as the store keeps them.
        quantized: Int8Weight | Int4Weight | None = None
        if fmt is not None and is_expert_key(key) and key.endswith(".weight"):
            quantized = fmt.quantize(tensor)
        elif key in dense_keys:
            quantized = quantize_int8(tensor)
        if quantized is not None:
            error = (quantized.dequantize() - tensor.to(torch.float32)).abs()
            report.tensors.append(TensorError(key, error.max().item(), error.mean().item()))
        if store is None or not is_expert_key(key):
            shards.add(key, tensor)  # dense weights stay float on disk (quantised when loaded)
            continue
        if quantized is not None:
            report.expert_bytes_before += tensor.numel() * tensor.element_size()
            report.expert_bytes_after += (
                quantized.nbytes
                if isinstance(quantized, Int4Weight)
                else quantized.q.numel() + 4 * quantized.scale.numel()
            )
        store.add(key, quantized if quantized is not None else tensor)
    shards.close()
    if store is not None:
        store.close()
    return report


def _carry(src: Path, dst: Path) -> None:
    for name in CARRIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for name in CARRIED_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)


@torch.inference_mode()
def _compare(src: Path, quantized: Path, report: QuantizeReport, *, num_inputs: int) -> None:
    """Logit difference and top-1 agreement of the two models on the source's greedy outputs."""
    from engine.generation import GenerationRequest, Generator, SamplingParams
    from engine.offload import load_for_inference

    before = load_for_inference(src, progress=False)
    after = load_for_inference(quantized, progress=False)
    try:
        config = before.model.config
        generator = Generator(before.model)
        rng = torch.Generator().manual_seed(0)
        low = max(config.pad_token_id, config.eos_token_id) + 1
        worst, agree, positions = 0.0, 0, 0
        for _ in range(num_inputs):
            ids = torch.randint(low, config.vocab_size, (16,), generator=rng).tolist()
            result = generator.generate([GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=16))])[0]
            decoder = torch.tensor([[config.decoder_start_token_id, *result.token_ids]])
            inputs, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
            logits_a = before.model(inputs, mask, decoder).float()
            logits_b = after.model(inputs, mask, decoder).float()
            worst = max(worst, (logits_a - logits_b).abs().max().item())
            agree += int((logits_a.argmax(-1) == logits_b.argmax(-1)).sum().item())
            positions += decoder.shape[1]
        report.num_inputs = num_inputs
        report.logit_max_abs_diff = worst
        report.top1_agreement = agree / positions
    finally:
        before.close()
        after.close()
