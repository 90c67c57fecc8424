"""cpm2 against HF transformers on random-weight M2M-100 / NLLB-200 models (`model_type: m2m_100`).

Checks, on the tiny `M2M100_CASES` of conftest (LayerNorm with bias, biased projections, scaled
scores, sinusoidal positions with fairseq's padding offset, scaled or unscaled embeddings):
teacher-forced logits within 1e-4 (fp32) on ragged, padded batches, packed and plain weights; greedy
and beam tokens equal to HF's on a ragged batch; bfloat16 close to float32; packed and plain CPU
kernels equal; incremental decoding (growing, ragged, reordered, concatenated caches) equal to one full
forward; left padding shifting no position; positions of soft prompts and decoder prefixes equal to
HF's for the same embeddings; the sinusoid table bitwise equal to HF's; sharded and alias-carrying
checkpoints; `cpm2 convert hf` output loading and matching; the config translation of
NLLB-200-distilled-600M's config.json and the validation of the architecture fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import M2M100_CASES, build_hf_model
from safetensors.torch import save_file
from test_decoding import _encode, _full_logits, _step
from test_parity_hf import _padded

from cpm2.cli import main
from engine.errors import ConfigError, InputError, UnsupportedModelError
from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.generation.inputs import encode_requests, feed_decoder_prefixes
from engine.model import Seq2SeqLM
from engine.model.kernels import MatmulPath, kernel_mode
from engine.model.position import sinusoidal_table
from engine.prompts import SoftPrompt
from engine.weights.hf import hf_to_config
from engine.weights.loader import load_model

CASES = list(M2M100_CASES)
PAD, EOS = 1, 2

# facebook/nllb-200-distilled-600M's config.json (the fields that matter; transformers 4.21 wrote it).
NLLB_200_DISTILLED_600M = {
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["M2M100ForConditionalGeneration"],
    "attention_dropout": 0.1,
    "bos_token_id": 0,
    "d_model": 1024,
    "decoder_attention_heads": 16,
    "decoder_ffn_dim": 4096,
    "decoder_layerdrop": 0,
    "decoder_layers": 12,
    "decoder_start_token_id": 2,
    "dropout": 0.1,
    "encoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "encoder_layerdrop": 0,
    "encoder_layers": 12,
    "eos_token_id": 2,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "max_length": 200,
    "max_position_embeddings": 1024,
    "model_type": "m2m_100",
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "scale_embedding": True,
    "tokenizer_class": "NllbTokenizer",
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256206,
}


def _hf(name: str):
    return build_hf_model(name, seed=CASES.index(name))


def _rows(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Random token rows without the special ids 0-3 (`<s>`, `<pad>`, `</s>`, `<unk>`)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (padding is the pad id, as a tokenizer pads) and attention mask."""
    ids, mask = _padded(rows)
    return ids.masked_fill(mask == 0, PAD), mask


def _until_eos(tokens: list[int]) -> list[int]:
    # HF pads finished rows of a batch with the pad id; a row ends at its first EOS.
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _hf_generate(hf, rows: list[list[int]], **kwargs) -> list[list[int]]:
    ids, mask = _batch(rows)
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
    return [_until_eos(row[1:]) for row in out.tolist()]


def _max_diff(got: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs()[valid.bool()].max().item()


def _teacher_forced(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    vocab = M2M100_CASES[name][2].get("vocab_size", 160)
    ids, mask = _batch(_rows([23, 9, 1, 16], vocab, seed))
    decoder_ids, decoder_mask = _batch([[EOS, *r] for r in _rows([6, 3, 6, 1], vocab, seed + 1)])
    return ids, mask, decoder_ids, decoder_mask


def test_nllb_200_config_translates() -> None:
    config = hf_to_config(NLLB_200_DISTILLED_600M, has_lm_head=True, source="nllb/config.json")
    assert (config.d_model, config.num_heads, config.d_kv, config.d_ff) == (1024, 16, 64, 4096)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.vocab_size) == (12, 12, 256206)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (1, 2, 2)
    assert (config.norm, config.layer_norm_eps) == ("layer", 1e-5)
    assert (config.position_embedding, config.scale_embedding) == ("sinusoidal", True)
    assert (config.has_attention_bias, config.has_ffn_bias, config.scale_attention_scores) == (True, True, True)
    assert (config.tie_word_embeddings, config.scale_decoder_output) == (True, False)
    assert (config.activation, config.is_gated_ffn, config.moe) == ("relu", False, None)
    assert config.extra["max_position_embeddings"] == 1024
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    assert not any("relative_bias" in key for key in model.state_dict())
    # Embedding 262.4M + encoder 151.2M + decoder 201.6M; the position table is computed, not stored.
    assert sum(p.numel() for p in model.parameters()) == 615_073_792


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm": "batch"}, "norm must be 'rms'"),
        ({"position_embedding": "rotary"}, "position_embedding must be"),
        ({"scale_embedding": "yes"}, "scale_embedding must be true or false"),
        ({"d_model": 2, "num_heads": 1, "d_kv": 2}, "needs d_model >= 4"),
    ],
)
def test_architecture_fields_are_validated(change: dict, message: str) -> None:
    config = hf_to_config(NLLB_200_DISTILLED_600M, has_lm_head=False, source="m/config.json")
    with pytest.raises(ConfigError, match=message):
        config.replace(**change)


@pytest.mark.parametrize("d_model", [32, 33, 1024])
def test_sinusoids_equal_hf_bitwise(d_model: int) -> None:
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    expected = M2M100SinusoidalPositionalEmbedding.get_embedding(1026, d_model, PAD)
    for size in (256, 1026, 3000):  # cpm2's table grows; HF's starts at max_position_embeddings + 2
        rows = min(size, 1026)
        assert torch.equal(sinusoidal_table(size, d_model, PAD)[:rows], expected[:rows])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decoder_attention_heads": 8}, "encoder_attention_heads 16 differs"),
        ({"decoder_ffn_dim": 2048}, "encoder_ffn_dim 4096 differs"),
        ({"activation_function": "quick_gelu"}, "activation_function 'quick_gelu'"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    ],
)
def test_unsupported_m2m100_configs_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        hf_to_config({**NLLB_200_DISTILLED_600M, **change}, has_lm_head=False, source="m/config.json")


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(name: str, pack: bool, m2m100_model_dirs: dict[str, Path]) -> None:
    hf = _hf(name)
    model, info = load_model(m2m100_model_dirs[name], pack=pack)
    assert (info.source_format, info.config.family) == ("hf", "m2m_100")
    ids, mask, decoder_ids, decoder_mask = _teacher_forced(name, seed=1)
    with torch.no_grad():
        expected = hf(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
        ).logits
        got = model(ids, mask, decoder_ids, decoder_mask)
    assert got.shape == expected.shape
    # Padded decoder positions differ by design (HF also hides them as keys; they are never read).
    assert _max_diff(got, expected, decoder_mask) <= 1e-4


def test_left_padded_encoder_input_matches_hf(m2m100_model_dirs: dict[str, Path]) -> None:
    """Positions count only unpadded tokens, so padding in front shifts no token's position."""
    hf = _hf("nllb-200")
    model, _ = load_model(m2m100_model_dirs["nllb-200"])
    ids, mask, decoder_ids, decoder_mask = _teacher_forced("nllb-200", seed=14)
    lengths = mask.sum(dim=1)
    shift = (ids.shape[1] - lengths).tolist()
    left_ids = torch.stack([row.roll(n) for row, n in zip(ids, shift, strict=True)])
    left_mask = torch.stack([row.roll(n) for row, n in zip(mask, shift, strict=True)])
    with torch.no_grad():
        expected = hf(
            input_ids=left_ids,
            attention_mask=left_mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=decoder_mask,
        ).logits
        got = model(left_ids, left_mask, decoder_ids, decoder_mask)
        right = model(ids, mask, decoder_ids, decoder_mask)
    assert _max_diff(got, expected, decoder_mask) <= 1e-4
    assert _max_diff(got, right, decoder_mask) <= 1e-4


# Random models tend to repeat one token; a repetition penalty makes them wander, so that every
# position's logits decide something.
@pytest.mark.parametrize("penalty", [None, 1.5], ids=["greedy", "repetition-penalty"])
@pytest.mark.parametrize("name", CASES)
def test_greedy_ragged_batch_matches_hf(name: str, penalty: float | None, m2m100_model_dirs: dict[str, Path]) -> None:
    hf = _hf(name)
    model, _ = load_model(m2m100_model_dirs[name])
    rows = _rows([5, 17, 9, 30], hf.config.vocab_size, seed=3)
    expected = _hf_generate(hf, rows, max_new_tokens=20, repetition_penalty=penalty)
    assert expected == [_hf_generate(hf, [row], max_new_tokens=20, repetition_penalty=penalty)[0] for row in rows]
    assert sum(len(e) for e in expected) > 20
    params = SamplingParams(max_new_tokens=20, repetition_penalty=penalty)
    got = Generator(model).generate([GenerationRequest(tuple(r), params) for r in rows])
    assert [r.token_ids for r in got] == expected
    for result in got:
        assert result.finish_reason == ("eos_token" if result.token_ids[-1] == EOS else "length")


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("name", ["m2m100", "nllb-200"])
def test_beam_search_matches_hf(name: str, num_beams: int, m2m100_model_dirs: dict[str, Path]) -> None:
    hf = _hf(name)
    model, _ = load_model(m2m100_model_dirs[name])
    rows = _rows([6, 13, 21], hf.config.vocab_size, seed=4)
    for length_penalty in (1.0, 0.5):
        expected = _hf_generate(hf, rows, max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
        params = SamplingParams(max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty)
        got = Generator(model).generate([GenerationRequest(tuple(r), params) for r in rows])
        assert [r.token_ids for r in got] == expected


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_forced_target_language_matches_hf(num_beams: int, m2m100_model_dirs: dict[str, Path]) -> None:
    # NLLB's target language: `forced_bos_token_id` in HF, `forced_tokens` here. The forced id is one
    # the model would not pick by itself, so forcing it changes every token after it.
    name = "nllb-200"
    hf = _hf(name)
    model, _ = load_model(m2m100_model_dirs[name])
    rows = _rows([7, 15, 4], hf.config.vocab_size, seed=5)
    lang = hf.config.vocab_size - 3
    expected = _hf_generate(hf, rows, max_new_tokens=12, num_beams=num_beams, forced_bos_token_id=lang)
    assert all(e[0] == lang for e in expected)
    assert expected != _hf_generate(hf, rows, max_new_tokens=12, num_beams=num_beams)
    params = SamplingParams(max_new_tokens=12, num_beams=num_beams, forced_tokens=(lang,))
    got = Generator(model).generate([GenerationRequest(tuple(r), params) for r in rows])
    assert [r.token_ids for r in got] == expected
    if num_beams == 1:  # the forced token's logprob is the model's own, as for every token
        assert all(r.logprobs[0] < 0 for r in got)


def test_forced_tokens_are_checked(m2m100_model_dirs: dict[str, Path]) -> None:
    model, _ = load_model(m2m100_model_dirs["m2m100"])
    vocab = model.config.vocab_size
    for num_beams in (1, 2):
        params = SamplingParams(max_new_tokens=3, num_beams=num_beams, forced_tokens=(vocab,))
        with pytest.raises(InputError, match=f"forced token id {vocab} is outside"):
            Generator(model).generate([GenerationRequest((5, 6, 2), params)])
    with pytest.raises(InputError, match="forced tokens must be token ids"):
        SamplingParams(forced_tokens=(-1,))


def test_bfloat16_close_to_float32(m2m100_model_dirs: dict[str, Path]) -> None:
    name = "nllb-200"
    ids, mask, decoder_ids, decoder_mask = _teacher_forced(name, seed=5)
    fp32, _ = load_model(m2m100_model_dirs[name], dtype="float32")
    bf16, _ = load_model(m2m100_model_dirs[name], dtype="bfloat16")
    with torch.no_grad():
        reference = fp32(ids, mask, decoder_ids, decoder_mask)
        got = bf16(ids, mask, decoder_ids, decoder_mask)
    assert got.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    # bf16 keeps 8 significant bits: a few units in the last place of the largest logits, after 5 blocks.
    assert _max_diff(got, reference, decoder_mask) <= 0.05 * scale
    agree = got.float().argmax(-1) == reference.argmax(-1)
    assert agree[decoder_mask.bool()].float().mean().item() >= 0.9


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [("float32", 1e-5, 1e-4), ("bfloat16", 2**-7, 0.1)])
def test_packed_equals_plain(dtype: str, rtol: float, atol: float, m2m100_model_dirs: dict[str, Path]) -> None:
    with kernel_mode("auto") as table:
        choice = table.for_dtype(getattr(torch, dtype))
    if choice.dense is not MatmulPath.ONEDNN_PACKED:
        pytest.skip(f"{dtype} has no packed oneDNN kernel on this CPU: {choice.reason}")
    path = m2m100_model_dirs["nllb-200"]
    with kernel_mode("auto"):
        packed, _ = load_model(path, dtype=dtype)
    with kernel_mode("plain"):
        plain, _ = load_model(path, dtype=dtype)
    # Biases stay plain vectors beside the packed weights and go into the same oneDNN call.
    assert packed.decoder.layers()[0].attn.qkv.weight.is_mkldnn
    assert not packed.decoder.layers()[0].attn.qkv.bias.is_mkldnn
    assert not any(p.is_mkldnn for p in plain.parameters())
    ids, mask, decoder_ids, decoder_mask = _teacher_forced("nllb-200", seed=6)
    with torch.no_grad():
        with kernel_mode("auto"):
            got_packed = packed(ids, mask, decoder_ids, decoder_mask).float()
        with kernel_mode("plain"):
            got_plain = plain(ids, mask, decoder_ids, decoder_mask).float()
    torch.testing.assert_close(got_packed, got_plain, rtol=rtol, atol=atol)


@torch.inference_mode()
@pytest.mark.parametrize("name", ["m2m100", "nllb-200"])
def test_incremental_decoding_equals_full_forward(name: str, m2m100_model_dirs: dict[str, Path]) -> None:
    model, _ = load_model(m2m100_model_dirs[name])
    vocab = model.config.vocab_size
    rows = _rows([11, 4], vocab, seed=7)
    decoders = [[EOS, *r] for r in _rows([8, 5], vocab, seed=8)]
    full = [_full_logits(model, row, decoder) for row, decoder in zip(rows, decoders, strict=True)]
    # Token by token, from a capacity of 2 (the cache grows on the way).
    state = _encode(model, rows[:1], capacity=2)
    steps = torch.stack([_step(model, state, [t])[0] for t in decoders[0]])
    assert (steps - full[0]).abs().max().item() <= 1e-4
    # Rows at different lengths (row 0 three steps ahead), admitted into one running batch.
    ahead = _encode(model, rows[:1], capacity=4)
    for t in decoders[0][:3]:
        _step(model, ahead, [t])
    batch = ahead
    batch.add(_encode(model, rows[1:], capacity=4))
    assert not batch.is_uniform
    for i in range(5):
        logits = _step(model, batch, [decoders[0][3 + i], decoders[1][i]])
        assert (logits[0] - full[0][3 + i]).abs().max().item() <= 1e-4
        assert (logits[1] - full[1][i]).abs().max().item() <= 1e-4
    # Rows reordered and repeated (beam search), then one more step each.
    picked = batch.select([1, 0, 1])
    logits = _step(model, picked, [decoders[1][5], decoders[0][8], decoders[1][5]])
    for got, (row, i) in zip(logits, [(1, 5), (0, 8), (1, 5)], strict=True):
        assert (got - full[row][i]).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_soft_prompt_and_decoder_prefix_positions_match_hf(m2m100_model_dirs: dict[str, Path]) -> None:
    """Virtual tokens count as positions: HF computes the same numbers for the same embeddings."""
    hf = _hf("nllb-200")
    model, _ = load_model(m2m100_model_dirs["nllb-200"])
    gen = torch.Generator().manual_seed(9)
    prompt = SoftPrompt(prefix=torch.randn(3, 64, generator=gen), decoder_prefix=torch.randn(2, 64, generator=gen))
    rows = _rows([7, 12], model.config.vocab_size, seed=10)
    targets = [[EOS, *r] for r in _rows([5, 5], model.config.vocab_size, seed=11)]
    requests = [GenerationRequest(tuple(r), prompt=prompt) for r in rows]
    enc, valid = encode_requests(model, requests)
    state = model.start_decoding(enc, valid, capacity=8)
    feed_decoder_prefixes(model, state, [prompt.decoder_prefix, prompt.decoder_prefix])
    got = model.logits(model.decode(model.embed(torch.tensor(targets)), state))

    embed = hf.get_input_embeddings()  # scales by sqrt(d_model), as cpm2's embedding does
    width = max(3 + len(r) for r in rows)
    inputs = torch.zeros(2, width, 64)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, : 3 + len(row)] = torch.cat([prompt.prefix, embed(torch.tensor(row))])
        mask[i, : 3 + len(row)] = 1
    decoder_inputs = torch.cat([prompt.decoder_prefix.expand(2, -1, -1), embed(torch.tensor(targets))], dim=1)
    expected = hf(inputs_embeds=inputs, attention_mask=mask, decoder_inputs_embeds=decoder_inputs).logits[:, 2:]
    assert (got - expected).abs().max().item() <= 1e-4


def test_sharded_checkpoint_with_aliases_loads(tmp_path: Path, m2m100_model_dirs: dict[str, Path]) -> None:
    hf = _hf("m2m100")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    # An older checkpoint: every alias of the shared embedding and the position tables stored too.
    with_aliases = tmp_path / "aliases"
    with_aliases.mkdir()
    hf.config.save_pretrained(with_aliases)
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["model.shared.weight"].clone()
    for stack in ("encoder", "decoder"):
        state[f"model.{stack}.embed_tokens.weight"] = state["model.shared.weight"].clone()
        state[f"model.{stack}.embed_positions.weights"] = getattr(hf.model, stack).embed_positions.weights.clone()
    save_file(state, str(with_aliases / "model.safetensors"), metadata={"format": "pt"})
    ids, mask, decoder_ids, decoder_mask = _teacher_forced("m2m100", seed=12)
    reference, _ = load_model(m2m100_model_dirs["m2m100"])
    with torch.no_grad():
        expected = reference(ids, mask, decoder_ids, decoder_mask)
        for path in (sharded, with_aliases):
            model, info = load_model(path)
            assert info.stored_dtype == torch.float32
            assert torch.equal(model(ids, mask, decoder_ids, decoder_mask), expected)


def test_cli_convert_hf_loads_and_matches(
    tmp_path: Path, m2m100_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = m2m100_model_dirs["nllb-200"]
    dst = tmp_path / "native"
    assert main(["convert", "hf", str(src), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((dst / "config.json").read_text())
    assert (saved["format"], saved["position_embedding"], saved["norm"]) == ("cpm2", "sinusoidal", "layer")
    native, info = load_model(dst)
    assert info.source_format == "cpm2"
    direct, _ = load_model(src)
    assert info.config.replace(extra={}) == direct.config.replace(extra={})
    ids, mask, decoder_ids, decoder_mask = _teacher_forced("nllb-200", seed=13)
    with torch.no_grad():
        assert torch.equal(native(ids, mask, decoder_ids, decoder_mask), direct(ids, mask, decoder_ids, decoder_mask))
        expected = _hf("nllb-200")(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
        ).logits
    assert _max_diff(native(ids, mask, decoder_ids, decoder_mask), expected, decoder_mask) <= 1e-4
