"""Switch Transformers expert placement against HF transformers (the reference), for every config HF saves.

HF makes block i of a stack an MoE block when `step > 0 and (i % step == 1 or step == 1)`, with step
the config.json's `encoder_sparse_step` / `decoder_sparse_step`, which may disagree with
`num_sparse_*_layers` (derived from those only when absent; see engine/weights/hf.py). Checks:
- placement: over a grid of layer counts, sparse-layer counts and stored, derived or absent steps,
  cpm2's MoE blocks are exactly the blocks HF builds sparse from the same config.json;
- parity on random-weight models (steps that disagree with `num_sparse_*`, steps 0-4 and negative,
  odd and unequal layer counts, 2 to 16 experts, binding capacities): teacher-forced logits within
  1e-4 in fp32, greedy and beam search identical to HF's `generate`;
- impossible values fail at load with a CheckpointError naming the field and what to change;
- `cpm2 generate` runs on the checkpoint of issue 19's report, which failed with
  "tensor 'encoder.block.0.layer.1.mlp.wi.weight' is missing".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HF_COMMON, build_hf_model, save_hf_model
from test_parity_hf import _hf_generate, _padded

from cpm2.cli import main
from engine.errors import CheckpointError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.tokenizer import SentencePieceTokenizer, train_sentencepiece
from engine.weights.hf import hf_to_config
from engine.weights.loader import load_model

#: The HF_CASES entry whose model and config classes every case here reuses (its fields overridden).
SWITCH = "switch-4e-step2"

#: name -> (config overrides, the MoE blocks HF builds: (encoder, decoder)). The expected blocks are
#: written out so a case documents itself; the tests also compare them with the HF model's own.
CASES: dict[str, tuple[dict[str, Any], tuple[tuple[int, ...], tuple[int, ...]]]] = {
    # Issue 19: the steps disagree with num_sparse_* (which alone would give (1, 3) and (0, 1, 2, 3)).
    "steps-disagree": (
        {"num_layers": 4, "num_decoder_layers": 4, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 4}
        | {"encoder_sparse_step": 1, "decoder_sparse_step": 2, "num_experts": 4, "expert_capacity": 64},
        ((0, 1, 2, 3), (1, 3)),
    ),
    "step1-derived-odd": (
        {"num_layers": 3, "num_decoder_layers": 1, "num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 1}
        | {"num_experts": 2, "expert_capacity": 64},
        ((0, 1, 2), (0,)),
    ),
    # num_sparse_* keep their default 3, which would give steps 1 and 1.
    "step2-odd": (
        {"num_layers": 5, "num_decoder_layers": 3, "encoder_sparse_step": 2, "decoder_sparse_step": 2}
        | {"num_experts": 4, "expert_capacity": 64},
        ((1, 3), (1,)),
    ),
    "step3-odd": (
        {"num_layers": 7, "num_decoder_layers": 4, "encoder_sparse_step": 3, "decoder_sparse_step": 3}
        | {"num_experts": 8, "expert_capacity": 64},
        ((1, 4), (1,)),
    ),
    "step4-16-experts": (
        {"num_layers": 9, "num_decoder_layers": 6, "encoder_sparse_step": 4, "decoder_sparse_step": 4}
        | {"num_experts": 16, "expert_capacity": 64},
        ((1, 5), (1, 5)),
    ),
    "enc-dec-differ": (
        {"num_layers": 6, "num_decoder_layers": 3, "encoder_sparse_step": 2, "decoder_sparse_step": 1}
        | {"num_experts": 8, "expert_capacity": 64},
        ((1, 3, 5), (0, 1, 2)),
    ),
    "16-layers": (
        {"num_layers": 16, "num_decoder_layers": 2, "num_sparse_encoder_layers": 5, "num_sparse_decoder_layers": 1}
        | {"num_experts": 2, "expert_capacity": 64},
        ((1, 4, 7, 10, 13), (1,)),
    ),
    "dense-encoder": (
        {"num_layers": 3, "num_decoder_layers": 5, "encoder_sparse_step": 0, "decoder_sparse_step": 3}
        | {"num_experts": 4, "expert_capacity": 64},
        ((), (1, 4)),
    ),
    "no-moe-at-all": (
        {"num_layers": 2, "num_decoder_layers": 3, "encoder_sparse_step": -1, "decoder_sparse_step": 0},
        ((), ()),
    ),
    # HF's "HACK: this will create 0 sparse layers" still makes block 1 (block 0 of one block) sparse.
    "zero-sparse-layers": (
        {"num_layers": 3, "num_decoder_layers": 1, "num_sparse_encoder_layers": 0, "num_sparse_decoder_layers": 0}
        | {"num_experts": 2, "expert_capacity": 64},
        ((1,), (0,)),
    ),
    # Capacities that bind: per sequence, only the first `capacity` tokens routed to an expert reach it.
    "capacity-1-2-experts": (
        {"num_layers": 3, "num_decoder_layers": 3, "encoder_sparse_step": 1, "decoder_sparse_step": 1}
        | {"num_experts": 2, "expert_capacity": 1},
        ((0, 1, 2), (0, 1, 2)),
    ),
    "capacity-3-16-experts": (
        {"num_layers": 2, "num_decoder_layers": 2, "encoder_sparse_step": 1, "decoder_sparse_step": 1}
        | {"num_experts": 16, "expert_capacity": 3},
        ((0, 1), (0, 1)),
    ),
    # HF keeps a token when its rank (from 1) is <= capacity: a negative capacity drops every token.
    "capacity-negative": (
        {"num_layers": 2, "num_decoder_layers": 2, "encoder_sparse_step": 1, "decoder_sparse_step": 2}
        | {"num_experts": 2, "expert_capacity": -1},
        ((0, 1), (1,)),
    ),
}
NAMES = list(CASES)


def _hf_reference(hf: Any, ids: list[int], **kwargs: Any) -> list[int]:
    """HF's `generate` with a cache that grows per layer: the default one is sized by the config's
    `num_hidden_layers`, which Switch maps to the encoder's `num_layers`, so a decoder deeper than
    the encoder overruns it (IndexError in transformers 5.x `DynamicCache.update`)."""
    from transformers import DynamicCache, EncoderDecoderCache

    return _hf_generate(hf, ids, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), **kwargs)


def _hf_sparse_blocks(hf: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    def sparse(stack: Any) -> tuple[int, ...]:
        return tuple(i for i, block in enumerate(stack.block) if block.is_sparse)

    return sparse(hf.encoder), sparse(hf.decoder)


def _cpm2_sparse_blocks(model_dir: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    config = hf_to_config(json.loads((model_dir / "config.json").read_text()), has_lm_head=False, source="test")
    return ((), ()) if config.moe is None else (config.moe.encoder_layers, config.moe.decoder_layers)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`saved(name)`: the case's HF model and the directory `save_pretrained` wrote (built once)."""
    cache: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in cache:
            hf = build_hf_model(SWITCH, seed=NAMES.index(name), **CASES[name][0])
            path = tmp_path_factory.mktemp("switch") / name
            save_hf_model(hf, path)
            cache[name] = hf, path
        return cache[name]

    return get


# ---- placement ----------------------------------------------------------------------------------------

# (num_sparse_*_layers, how the step reaches config.json): "absent" deletes it after saving, so HF and
# cpm2 derive it; "saved" lets HF derive and write it; an int is passed to HF, which stores it as is.
STACK_SPECS: list[tuple[int, int | str]] = [(n, "absent") for n in (-1, 0, 1, 2, 3, 4, 20)]
STACK_SPECS += [(n, "saved") for n in (0, 3)]
STACK_SPECS += [(2, step) for step in (-2, 0, 1, 2, 3, 4, 7)]
LAYER_COUNTS = (1, 2, 3, 5, 8, 16)


@pytest.mark.parametrize("spec", range(len(STACK_SPECS)), ids=[f"{n}-{s}" for n, s in STACK_SPECS])
def test_placement_matches_hf_for_every_config(spec: int, tmp_path: Path) -> None:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    # The decoder takes another spec and the layer counts in reverse, so the two stacks differ.
    specs = {"encoder": STACK_SPECS[spec], "decoder": STACK_SPECS[(spec + 5) % len(STACK_SPECS)]}
    for num_layers, num_decoder_layers in zip(LAYER_COUNTS, reversed(LAYER_COUNTS), strict=True):
        kwargs: dict[str, Any] = {"num_layers": num_layers, "num_decoder_layers": num_decoder_layers}
        for stack, (num_sparse, step) in specs.items():
            kwargs[f"num_sparse_{stack}_layers"] = num_sparse
            if isinstance(step, int):
                kwargs[f"{stack}_sparse_step"] = step
        model_dir = tmp_path / f"{num_layers}-{num_decoder_layers}"
        SwitchTransformersConfig(**HF_COMMON, **kwargs, num_experts=2).save_pretrained(model_dir)
        data = json.loads((model_dir / "config.json").read_text())
        for stack, (_, step) in specs.items():
            if step == "absent":
                del data[f"{stack}_sparse_step"]
            else:
                assert f"{stack}_sparse_step" in data  # save_pretrained writes the step, derived or not
        (model_dir / "config.json").write_text(json.dumps(data))

        config = SwitchTransformersConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # only the block structure is needed: no weights
            hf = SwitchTransformersForConditionalGeneration(config)
        assert _cpm2_sparse_blocks(model_dir) == _hf_sparse_blocks(hf), kwargs


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("encoder_sparse_step", None),
        ("encoder_sparse_step", "2"),
        ("decoder_sparse_step", 1.5),
        ("decoder_sparse_step", True),
        ("num_sparse_encoder_layers", None),
        ("expert_capacity", "64"),
    ],
)
def test_impossible_values_are_checkpoint_errors(field: str, value: Any) -> None:
    data: dict[str, Any] = {"model_type": "switch_transformers", "num_layers": 4, "num_decoder_layers": 4}
    if field.startswith("num_sparse"):
        data["decoder_sparse_step"] = 2  # the step is absent, so num_sparse_* decides
    else:
        data |= {"encoder_sparse_step": 2, "decoder_sparse_step": 2}
    data[field] = value
    with pytest.raises(
        CheckpointError, match=re.escape(f"m/config.json: {field} must be an integer, got {value!r}; set")
    ):
        hf_to_config(data, has_lm_head=False, source="m/config.json")


# ---- parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(name: str, saved: Any, random_ids: Any) -> None:
    hf, path = saved(name)
    assert _hf_sparse_blocks(hf) == CASES[name][1] == _cpm2_sparse_blocks(path)
    # Ragged, right-padded encoder rows and 7 decoder positions: capacity 1-3 binds in both stacks.
    ids, mask = _padded(random_ids([23, 9, 1, 16], seed=1))
    decoder_ids = torch.tensor(random_ids([7] * 4, seed=2))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    for pack in (True, False):
        model, _ = load_model(path, pack=pack)
        with torch.no_grad():
            got = model(ids, mask, decoder_ids)
        assert got.dtype == torch.float32
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4, pack


@pytest.mark.parametrize("name", NAMES)
def test_greedy_and_beam_search_match_hf(name: str, saved: Any, random_ids: Any) -> None:
    hf, path = saved(name)
    model, _ = load_model(path)
    generator = Generator(model)
    rows = random_ids([5, 17, 9], seed=3)
    expected = [_hf_reference(hf, row, max_new_tokens=16) for row in rows]
    assert any(len(e) > 1 for e in expected)
    greedy = SamplingParams(max_new_tokens=16)
    got = generator.generate([GenerationRequest(tuple(r), greedy) for r in rows])
    assert [r.token_ids for r in got] == expected
    for num_beams in (2, 4):
        params = SamplingParams(max_new_tokens=12, num_beams=num_beams)
        for row in rows[:2]:
            expected_beam = _hf_reference(hf, row, max_new_tokens=12, num_beams=num_beams)
            assert generator.generate([GenerationRequest(tuple(row), params)])[0].token_ids == expected_beam


# ---- the command line ------------------------------------------------------------------------------------

CORPUS = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(40)]


def test_cli_generate_runs_the_issue_19_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spiece = train_sentencepiece(CORPUS, tmp_path / "spm" / "spiece.model", vocab_size=40, byte_fallback=False)
    tokenizer = SentencePieceTokenizer(spiece)
    overrides = CASES["steps-disagree"][0] | {"vocab_size": tokenizer.vocab_size}
    hf = build_hf_model(SWITCH, seed=7, **overrides)
    model_dir = tmp_path / "switch"
    save_hf_model(hf, model_dir)
    (model_dir / "spiece.model").write_bytes(spiece.read_bytes())
    data = json.loads((model_dir / "config.json").read_text())
    # The report's config.json: HF puts experts in encoder block 0, num_sparse_encoder_layers says not.
    assert (data["encoder_sparse_step"], data["num_sparse_encoder_layers"], data["num_layers"]) == (1, 2, 4)

    text = "the lazy fox"
    capsys.readouterr()
    code = main(["generate", "--model", str(model_dir), "--json", "--max-new-tokens", "12", text])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert json.loads(out)["token_ids"] == _hf_reference(hf, tokenizer.encode(text), max_new_tokens=12)
