"""`cpm2 quantize --model DIR --out DIR --experts int8 [--dense int8]`: a model with int8 weights.

The source streams through one tensor at a time (`native_tensors`): dense tensors go unchanged into
bounded shards, expert weights are quantised per output row (`engine.model.quant`) into an int8
expert store (`engine.experts.store`), so memory holds one tensor and one blob, never a layer of
experts more. The new directory is built under a temporary name beside `--out` and renamed into
place only when it is complete and checked: a failure, or bad input, writes nothing.

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
from engine.experts.store import INT8_SCHEME, ExpertStoreWriter, is_expert_key
from engine.model import Seq2SeqLM
from engine.model.linear import Linear
from engine.model.quant import quantize_int8
from engine.weights.convert import CARRIED_FILES
from engine.weights.files import ShardWriter, open_tensor_source
from engine.weights.init import DEFAULT_MAX_SHARD_BYTES
from engine.weights.loader import CONFIG_FILE, inspect_checkpoint, native_tensors

#: Formats `--experts` and `--dense` take.
EXPERT_FORMATS = ("int8",)
DENSE_FORMATS = ("int8",)
REPORT_FILE = "quantization_report.json"
#: Directories carried over unchanged (a model's bundled soft prompts are trained for its embeddings,
#: which quantising the experts leaves as they are).
CARRIED_DIRS = ("prompts",)


#: Where a model directory's config.json records what `cpm2 quantize` quantised.
QUANTIZATION_KEY = "quantization"


def _quantized(config: ModelConfig, part: str) -> str | None:
    record = config.extra.get(QUANTIZATION_KEY)
    return str(record.get(part)) if isinstance(record, dict) and record.get(part) else None


def quantized_experts(config: ModelConfig) -> str | None:
    """The format a model's experts were quantised to (`"int8"`), None for float experts."""
    return _quantized(config, "experts")


def quantized_dense(config: ModelConfig) -> str | None:
    """The format a model's dense weights run in (`"int8"`: quantised when loaded), None for float."""
    return _quantized(config, "dense")


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
        lines = [
            f"experts: {self.experts or 'as stored'}, dense: {self.dense or 'as stored'} ({self.scheme}), "
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


def _check_request(src: Path, dst: Path, experts: str | None, dense: str | None) -> None:
    if experts is None and dense is None:
        raise ConfigError("nothing to quantise: give --experts int8, --dense int8 or both")
    if experts is not None and experts not in EXPERT_FORMATS:
        raise ConfigError(f"--experts {experts}: unknown format; supported: {', '.join(EXPERT_FORMATS)}")
    if dense is not None and dense not in DENSE_FORMATS:
        raise ConfigError(f"--dense {dense}: unknown format; supported: {', '.join(DENSE_FORMATS)}")
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
    check_inputs: int = 4,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> QuantizeReport:
    """Write `dst`: `src` with its experts quantised to `experts`; returns (and saves) the report."""
    src, dst = Path(src), Path(dst)
    _check_request(src, dst, experts, dense)
    files = open_tensor_source(src)
    try:
        info = inspect_checkpoint(src, files)
        config = info.config
        if experts is not None and config.moe is None:
            raise ConfigError(f"{src}: a dense model has no experts to quantise; leave --experts out")
        if experts is not None and quantized_experts(config) is not None:
            raise ConfigError(f"{src}: its experts are already quantised ({quantized_experts(config)})")
        if dense is not None and quantized_dense(config) is not None:
            raise ConfigError(f"{src}: its dense weights are already quantised ({quantized_dense(config)})")
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            # Experts already int8 stay int8 (re-quantising their dequantised values gives the same bytes).
            report = _write(
                info,
                files,
                work,
                experts=experts or quantized_experts(config),
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
        record = {**(previous if isinstance(previous, dict) else {}), "scheme": INT8_SCHEME, "source": str(src)}
        record.update({part: f for part, f in (("experts", experts), ("dense", dense)) if f is not None})
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


def _dense_linear_keys(config: ModelConfig) -> set[str]:
    """The weights `--dense int8` runs in int8: every `Linear`'s but the experts'."""
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear) and ".experts." not in name}


def _write(
    info: Any, files: Any, out: Path, *, experts: str | None, dense: str | None, max_shard_bytes: int, progress: bool
) -> QuantizeReport:
    report = QuantizeReport(source=str(info.path), experts=experts, dense=dense, scheme=INT8_SCHEME)
    shards = ShardWriter(out, max_shard_bytes=max_shard_bytes, metadata={"producer": "cpm2 quantize"})
    # Experts kept as they are go into a float store as before.
    store = (
        ExpertStoreWriter(out, info.config, torch.int8 if experts else info.stored_dtype)
        if info.config.moe is not None
        else None
    )
    dense_keys = _dense_linear_keys(info.config) if dense else set()
    tensors = native_tensors(info, files, dtype=info.stored_dtype, device=torch.device("cpu"))
    for key, tensor in tqdm(tensors, desc="quantizing", unit="tensor", disable=not progress):
        # Expert biases (NLLB-MoE) stay float beside the int8 values, as the store keeps them.
        is_matrix = key in dense_keys or (experts and is_expert_key(key) and key.endswith(".weight"))
        quantized = quantize_int8(tensor) if is_matrix else None
        if quantized is not None:
            error = (quantized.dequantize() - tensor.to(torch.float32)).abs()
            report.tensors.append(TensorError(key, error.max().item(), error.mean().item()))
        if store is None or not is_expert_key(key):
            shards.add(key, tensor)  # dense weights stay float on disk (quantised when loaded)
            continue
        if quantized is not None:
            report.expert_bytes_before += tensor.numel() * tensor.element_size()
            report.expert_bytes_after += quantized.q.numel() + 4 * quantized.scale.numel()
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
