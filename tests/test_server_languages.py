"""Languages on the generation routes, served by a real tiny NLLB-200-shaped model with NLLB's tokenizer.

`src_lang` / `tgt_lang` (in TGI's `parameters`, top-level in `/v1/completions`) must give the ids a
transformers user gets from `NllbTokenizer(src_lang=...)` + `generate(forced_bos_token_id=...)`,
streamed or not, alone or batched with soft-prompt requests; an unknown code or a model without
language codes is a 422 that names the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import build_hf_model, save_hf_model
from fastapi.testclient import TestClient
from server_fakes import local_client
from test_tokenizer_nllb import EXTRA_LINES, train_nllb_like, write_hub_dir
from test_translation_cli import _hf_translate

from engine.prompts import SoftPrompt
from engine.serving.engine import AsyncEngine, EngineConfig
from engine.tokenizer import builtin_corpus
from engine.tokenizer.nllb import nllb200_language_codes
from server.app import create_app
from server.settings import Settings

TEXT = "hello world"
NEW_TOKENS = 8


def _client(model_dir: Path, store: Path) -> TestClient:
    settings = Settings(prompt_store=store, max_input_tokens=256, max_total_tokens=512, allow_local_admin=True)
    engine = AsyncEngine.from_config(EngineConfig(model=model_dir, max_batch_size=8, max_queue=64))
    return local_client(create_app(settings, engine))


@pytest.fixture(scope="module")
def nllb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any, Any]]:
    directory = write_hub_dir(tmp_path_factory.mktemp("nllb-tiny"), train_nllb_like([*builtin_corpus(), *EXTRA_LINES]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    hf = build_hf_model("nllb-200", seed=7, vocab_size=len(tokenizer))
    save_hf_model(hf, directory)
    with _client(directory, tmp_path_factory.mktemp("store")) as client:
        yield client, hf, tokenizer


def _generate(client: TestClient, parameters: dict[str, object], text: str = TEXT) -> dict[str, Any]:
    body = {"inputs": text, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, **parameters}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(response: dict[str, Any]) -> list[int]:
    return [t["id"] for t in response["details"]["tokens"]]


@pytest.mark.parametrize(("src", "tgt"), [("eng_Latn", "fra_Latn"), ("zho_Hans", "deu_Latn")])
def test_generate_equals_transformers(nllb: tuple[TestClient, Any, Any], src: str, tgt: str) -> None:
    client, hf, tokenizer = nllb
    text = TEXT if src == "eng_Latn" else "北京是中国的首都"
    expected = _hf_translate(hf, tokenizer, text, src=src, tgt=tgt, max_new_tokens=NEW_TOKENS)
    response = _generate(client, {"src_lang": src, "tgt_lang": tgt}, text)
    assert _ids(response) == expected
    assert expected[0] == tokenizer.convert_tokens_to_ids(tgt)
    # The code is a special token: not in the text.
    assert response["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert response["details"]["input_length"] == len(tokenizer(text)["input_ids"])


def test_stream_and_compat_route_equal_generate(nllb: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = nllb
    parameters = {"max_new_tokens": NEW_TOKENS, "src_lang": "eng_Latn", "tgt_lang": "fra_Latn"}
    expected = _ids(_generate(client, parameters))
    with client.stream("POST", "/generate_stream", json={"inputs": TEXT, "parameters": parameters}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == expected
    assert events[0]["token"]["special"]
    compat = client.post("/", json={"inputs": TEXT, "parameters": {**parameters, "details": True}})
    assert compat.status_code == 200, compat.text
    assert _ids(compat.json()[0]) == expected


def test_completions_equal_generate(nllb: tuple[TestClient, Any, Any]) -> None:
    client, hf, tokenizer = nllb
    expected = _hf_translate(hf, tokenizer, TEXT, src="eng_Latn", tgt="fra_Latn", max_new_tokens=NEW_TOKENS)
    model = client.get("/info").json()["model_id"]
    body = {"model": model, "prompt": TEXT, "max_tokens": NEW_TOKENS, "src_lang": "eng_Latn", "tgt_lang": "fra_Latn"}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_target_language_alone_is_forced(nllb: tuple[TestClient, Any, Any]) -> None:
    client, _, tokenizer = nllb
    assert _ids(_generate(client, {"tgt_lang": "deu_Latn"}))[0] == tokenizer.convert_tokens_to_ids("deu_Latn")


def test_languages_batch_with_soft_prompts(nllb: tuple[TestClient, Any, Any]) -> None:
    """Requests with languages, soft prompts, both and neither, sent together, equal one-by-one."""
    client, _, _ = nllb
    torch.manual_seed(0)
    d_model = client.get("/info").json()["d_model"]
    prompt = SoftPrompt(prefix=torch.randn(3, d_model) * 0.5)
    files = {"file": ("p.safetensors", prompt.to_bytes(), "application/octet-stream")}
    assert client.post("/prompts", files=files, data={"id": "front"}).status_code == 201
    variants: list[dict[str, object]] = [
        {"src_lang": "eng_Latn", "tgt_lang": "fra_Latn"},
        {"src_lang": "eng_Latn", "tgt_lang": "fra_Latn", "prompt_id": "front"},
        {"prompt_id": "front"},
        {},
        {"tgt_lang": "spa_Latn", "prompt_id": "front"},
    ]
    parameters = [{**v, "ignore_eos": True} for v in variants * 2]
    alone = [_ids(_generate(client, p)) for p in parameters]
    with ThreadPoolExecutor(len(parameters)) as pool:
        together = list(pool.map(lambda p: _ids(_generate(client, p)), parameters))
    assert together == alone
    assert alone[1] != alone[0]  # the prompt is applied


@pytest.mark.parametrize("field", ["src_lang", "tgt_lang"])
def test_unknown_code_is_422_naming_the_field(nllb: tuple[TestClient, Any, Any], field: str) -> None:
    client, _, _ = nllb
    r = client.post("/generate", json={"inputs": TEXT, "parameters": {field: "fra_latn"}})
    assert r.status_code == 422
    assert r.json()["error"].startswith(f"{field}: unknown language code 'fra_latn'; did you mean 'fra_Latn'?")
    model = client.get("/info").json()["model_id"]
    r = client.post("/v1/completions", json={"model": model, "prompt": TEXT, field: "zzz_Zzzz"})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith(f"{field}: unknown language code 'zzz_Zzzz'")


def test_source_language_with_text_pair_is_refused(nllb: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = nllb
    r = client.post("/generate", json={"inputs": TEXT, "parameters": {"src_lang": "eng_Latn", "text_pair": "x"}})
    assert r.status_code == 422
    assert r.json()["error"].startswith("src_lang:")


def test_info_lists_languages(nllb: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = nllb
    languages = client.get("/info").json()["languages"]
    assert "eng_Latn" in languages
    assert languages == list(nllb200_language_codes())


def test_model_without_language_codes(tiny_model_dir: Path, tmp_path: Path) -> None:
    with _client(tiny_model_dir, tmp_path / "store") as client:
        info = client.get("/info").json()
        assert info["languages"] == []
        for field in ("src_lang", "tgt_lang"):
            r = client.post("/generate", json={"inputs": TEXT, "parameters": {field: "fra_Latn"}})
            assert r.status_code == 422, r.text
            assert r.json()["error"].startswith(f"{field}: ")
            assert "without language codes" in r.json()["error"]
            r = client.post("/v1/completions", json={"model": info["model_id"], "prompt": TEXT, field: "fra_Latn"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["message"].startswith(f"{field}: ")
        r = client.post("/generate", json={"inputs": TEXT, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200
