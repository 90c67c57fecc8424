"""`cpm2 generate --src-lang --tgt-lang` on a tiny random NLLB-200-shaped model with NLLB's tokenizer.

The reference is what a transformers user runs: `NllbTokenizer(src_lang=...)` for the input and
`generate(forced_bos_token_id=<target language id>)`, on the same directory. Plus the refusals: an
unknown code, a model without language codes, a source language on token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import transformers
from conftest import build_hf_model, save_hf_model
from test_tokenizer_nllb import EXTRA_LINES, train_nllb_like, write_hub_dir

from cpm2.cli import main
from engine.tokenizer import builtin_corpus

TEXTS = ["hello world", "北京是中国的首都"]


@pytest.fixture(scope="module")
def nllb_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    directory = write_hub_dir(tmp_path_factory.mktemp("nllb-tiny"), train_nllb_like([*builtin_corpus(), *EXTRA_LINES]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    hf = build_hf_model("nllb-200", seed=7, vocab_size=len(tokenizer))
    save_hf_model(hf, directory)
    return directory, hf, tokenizer


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _hf_translate(hf: Any, tokenizer: Any, text: str, *, src: str, tgt: str, **kwargs: Any) -> list[int]:
    tokenizer.src_lang = src
    inputs = tokenizer(text, return_tensors="pt")
    forced = tokenizer.convert_tokens_to_ids(tgt)
    out = hf.generate(**inputs, forced_bos_token_id=forced, do_sample=False, **kwargs)[0].tolist()[1:]
    eos = hf.config.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize(("src", "tgt"), [("eng_Latn", "fra_Latn"), ("zho_Hans", "deu_Latn")])
def test_translation_equals_transformers(
    nllb_dir: tuple[Path, Any, Any], capsys: pytest.CaptureFixture[str], src: str, tgt: str, num_beams: int
) -> None:
    directory, hf, tokenizer = nllb_dir
    argv = ["generate", "--model", directory, "--json", "--max-new-tokens", "10", "--num-beams", str(num_beams)]
    code, out, err = _run(capsys, *argv, "--src-lang", src, "--tgt-lang", tgt, *TEXTS)
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    for text, result in zip(TEXTS, results, strict=True):
        expected = _hf_translate(hf, tokenizer, text, src=src, tgt=tgt, max_new_tokens=10, num_beams=num_beams)
        assert result["token_ids"] == expected
        assert result["token_ids"][0] == tokenizer.convert_tokens_to_ids(tgt)
        # The language code is a special token: not part of the text.
        assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_unknown_language_code_suggests_close_ones(
    nllb_dir: tuple[Path, Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _, _ = nllb_dir
    code, out, err = _run(capsys, "generate", "--model", directory, "--tgt-lang", "fra_latn", "hello")
    assert code == 2
    assert out == ""
    assert "unknown language code 'fra_latn'; did you mean 'fra_Latn'?" in err


def test_languages_on_a_model_without_language_codes(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "generate", "--model", tiny_model_dir, "--src-lang", "eng_Latn", "hello")
    assert code == 2
    assert "without language codes" in err
    assert "leave the languages out" in err


def test_source_language_needs_text(nllb_dir: tuple[Path, Any, Any], capsys: pytest.CaptureFixture[str]) -> None:
    directory, _, _ = nllb_dir
    code, _, err = _run(capsys, "generate", "--model", directory, "--src-lang", "eng_Latn", "--input-ids", "5,6,2")
    assert code == 2
    assert "--src-lang encodes text inputs" in err
    # A target language works on token ids: it only forces the first generated token.
    code, out, err = _run(
        capsys, "generate", "--model", directory, "--json", "--tgt-lang", "fra_Latn", "--input-ids", "5,6,2"
    )
    assert code == 0, err
    assert json.loads(out)["token_ids"][0] == nllb_dir[2].convert_tokens_to_ids("fra_Latn")
