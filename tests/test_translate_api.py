"""LibreTranslate's API (`/translate`, `/languages`), driven by its real Python client over HTTP.

One uvicorn server on loopback serves a tiny NLLB-200-shaped model with NLLB's tokenizer and an API
key; `libretranslatepy` (which sends form bodies, the key in the body) must get what `/generate`
with `src_lang`/`tgt_lang` gives for the same text. Form and multipart bodies, batches and the
errors LibreTranslate's clients expect (`{"error"}`, 400/403) are checked in-process too.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import transformers
from conftest import build_hf_model, save_hf_model
from fastapi.testclient import TestClient
from libretranslatepy import LibreTranslateAPI
from server_fakes import local_client
from server_process import serve_in_thread
from test_tokenizer_nllb import EXTRA_LINES, train_nllb_like, write_hub_dir

from engine.serving.engine import AsyncEngine, EngineConfig
from engine.serving.protocol import StepRecord
from engine.tokenizer import builtin_corpus
from server.app import create_app
from server.languages import LANGUAGES
from server.settings import Settings

KEY = "test-key-123"
TEXTS = ["hello world", "the cat sat on the mat", "北京是中国的首都"]


def _settings(store: Path) -> Settings:
    return Settings(
        prompt_store=store,
        api_key=KEY,
        max_input_tokens=128,
        max_total_tokens=256,
        max_new_tokens=8,
        allow_local_admin=True,
    )


def _engine(model_dir: Path) -> AsyncEngine:
    return AsyncEngine.from_config(EngineConfig(model=model_dir, max_batch_size=8, max_queue=32))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_hub_dir(tmp_path_factory.mktemp("nllb-tiny"), train_nllb_like([*builtin_corpus(), *EXTRA_LINES]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    save_hf_model(build_hf_model("nllb-200", seed=7, vocab_size=len(tokenizer)), directory)
    return directory


@pytest.fixture(scope="module")
def base_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A uvicorn server in a thread, on a loopback socket bound here (as tests/test_real_clients.py)."""
    app = create_app(_settings(tmp_path_factory.mktemp("store")), _engine(model_dir))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def lt(base_url: str) -> LibreTranslateAPI:
    return LibreTranslateAPI(base_url, api_key=KEY)


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with local_client(create_app(_settings(tmp_path_factory.mktemp("store")), _engine(model_dir))) as c:
        yield c


def _generate(base_url: str, text: str, src: str, tgt: str) -> str:
    body = {"inputs": text, "parameters": {"src_lang": src, "tgt_lang": tgt}}
    r = httpx.post(f"{base_url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["generated_text"])


def _http_error(exc: pytest.ExceptionInfo[urllib.error.HTTPError]) -> tuple[int, dict[str, object]]:
    return exc.value.code, json.loads(exc.value.read())


# ---- the real client, over HTTP ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "src", "tgt"), [("en", "fr", "eng_Latn", "fra_Latn"), ("zh", "de", "zho_Hans", "deu_Latn")]
)
def test_client_translate_equals_generate(
    lt: LibreTranslateAPI, base_url: str, source: str, target: str, src: str, tgt: str
) -> None:
    text = TEXTS[0] if source == "en" else TEXTS[2]
    translated = lt.translate(text, source, target, timeout=60)
    assert isinstance(translated, str)
    assert translated == _generate(base_url, text, src, tgt)


def test_list_is_one_batch_with_the_same_shape(lt: LibreTranslateAPI, base_url: str) -> None:
    # libretranslatepy sends one text per call; a list goes as JSON, as LibreTranslate's JS clients do.
    r = httpx.post(
        f"{base_url}/translate", json={"q": TEXTS, "source": "en", "target": "es", "api_key": KEY}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"translatedText": [lt.translate(t, "en", "es", timeout=60) for t in TEXTS]}


def test_client_languages(lt: LibreTranslateAPI) -> None:
    languages = lt.languages(timeout=60)
    codes = [entry["code"] for entry in languages]
    assert codes == [language.code for language in LANGUAGES]  # the tiny model has all 202 NLLB codes
    english = languages[codes.index("en")]
    assert english["name"] == "English"
    assert "en" not in english["targets"]
    assert {"fr", "zh-Hans", "zh-Hant", "pt-BR"} <= set(english["targets"])
    portuguese = languages[codes.index("pt")]
    assert "pt-BR" not in portuguese["targets"]  # one NLLB language


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("en", "xx", "target: xx is not supported"),
        ("eng_latn", "fr", "source: eng_latn is not supported"),
    ],
)
def test_client_raises_on_bad_languages(lt: LibreTranslateAPI, source: str, target: str, message: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        lt.translate(TEXTS[0], source, target, timeout=60)
    status, body = _http_error(exc)
    assert status == 400
    assert str(body["error"]).startswith(message)
    assert set(body) == {"error"}


def test_api_key_in_body_or_header(base_url: str) -> None:
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            LibreTranslateAPI(base_url, api_key=key).translate(TEXTS[0], "en", "fr", timeout=60)
        status, body = _http_error(exc)
        assert status == 403
        assert "API key" in str(body["error"])
    header = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{base_url}/translate", data={"q": TEXTS[0], "source": "en", "target": "fr"}, headers=header)
    assert r.status_code == 200, r.text
    # /languages is open, as on LibreTranslate.
    assert httpx.get(f"{base_url}/languages").status_code == 200


def test_html_is_refused_over_http(base_url: str) -> None:
    body = {"q": "<p>hello <b>world</b></p>", "source": "en", "target": "fr", "format": "html", "api_key": KEY}
    r = httpx.post(f"{base_url}/translate", json=body)
    assert r.status_code == 400
    assert r.json() == {"error": "html format is not supported yet; send plain text with format=text"}


# ---- in-process: bodies, codes, errors --------------------------------------------------------


def _translate(client: TestClient, **kwargs: object) -> httpx.Response:
    return client.post("/translate", headers={"Authorization": f"Bearer {KEY}"}, **kwargs)  # type: ignore[arg-type]


def test_form_multipart_and_json_bodies_agree(client: TestClient) -> None:
    fields = {"q": TEXTS[1], "source": "en", "target": "fr"}
    as_json = _translate(client, json=fields)
    assert as_json.status_code == 200, as_json.text
    as_form = _translate(client, data=fields)
    as_multipart = _translate(client, files={k: (None, v) for k, v in fields.items()})
    assert as_form.json() == as_multipart.json() == as_json.json()
    assert isinstance(as_json.json()["translatedText"], str)


def test_form_list_and_line_endings(client: TestClient) -> None:
    repeated = _translate(client, data={"q": TEXTS[:2], "source": "en", "target": "fr"})
    assert repeated.status_code == 200, repeated.text
    one_by_one = [_translate(client, json={"q": t, "source": "en", "target": "fr"}).json() for t in TEXTS[:2]]
    assert repeated.json() == {"translatedText": [r["translatedText"] for r in one_by_one]}
    crlf = _translate(client, data={"q": "hello\r\nworld", "source": "en", "target": "fr"})
    lf = _translate(client, json={"q": "hello\nworld", "source": "en", "target": "fr"})
    assert crlf.json() == lf.json()


def test_codes_aliases_and_model_codes(client: TestClient) -> None:
    def text(source: str, target: str) -> object:
        r = _translate(client, json={"q": TEXTS[2], "source": source, "target": target})
        assert r.status_code == 200, r.text
        return r.json()["translatedText"]

    assert text("zh", "pt") == text("zh-Hans", "pt-BR") == text("zho_Hans", "por_Latn")
    assert text("zh-Hant", "pt") == text("zho_Hant", "por_Latn")


def test_alternatives_are_the_next_best_beams(client: TestClient) -> None:
    fields = {"q": TEXTS[0], "source": "en", "target": "fr"}
    plain = _translate(client, json=fields).json()
    assert _translate(client, json={**fields, "alternatives": 0}).json() == plain  # no "alternatives" key
    answer = _translate(client, json={**fields, "alternatives": 2}).json()
    # The best of a 3-beam search, and the next two, as /generate's beam search ranks them.
    body = {"inputs": TEXTS[0], "parameters": {"src_lang": "eng_Latn", "tgt_lang": "fra_Latn", "num_beams": 3}}
    best = client.post("/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert answer["translatedText"] == best["generated_text"]
    alternatives = answer["alternatives"]
    assert 1 <= len(alternatives) <= 2
    assert len(set(alternatives)) == len(alternatives)
    assert answer["translatedText"] not in alternatives
    batch = _translate(client, json={**fields, "q": TEXTS[:2], "alternatives": 1}).json()
    assert batch["translatedText"][0] == _translate(client, json={**fields, "alternatives": 1}).json()["translatedText"]
    assert [len(a) for a in batch["alternatives"]] in ([1, 1], [1, 0], [0, 1], [0, 0])
    over = _translate(client, json={**fields, "alternatives": 4})
    assert over.status_code == 400
    assert over.json()["error"] == "Invalid request: alternatives parameter must be <= 3"


def test_client_translates_from_auto(lt: LibreTranslateAPI, base_url: str) -> None:
    """`source: auto`: the real client's request, translated from the detected language."""
    assert lt.translate(TEXTS[0], "auto", "fr", timeout=60) == _generate(base_url, TEXTS[0], "eng_Latn", "fra_Latn")


def test_auto_detects_each_text_and_says_so(client: TestClient) -> None:
    one = _translate(client, json={"q": TEXTS[2], "source": "auto", "target": "de"}).json()
    explicit = _translate(client, json={"q": TEXTS[2], "source": "zh", "target": "de"}).json()
    assert one["translatedText"] == explicit["translatedText"]
    assert one["detectedLanguage"]["language"] == "zh-Hans"
    assert 0 < one["detectedLanguage"]["confidence"] <= 100
    batch = _translate(client, json={"q": [TEXTS[1], TEXTS[2]], "source": "auto", "target": "de"}).json()
    assert [d["language"] for d in batch["detectedLanguage"]] == ["en", "zh-Hans"]
    english = _translate(client, json={"q": TEXTS[1], "source": "en", "target": "de"}).json()["translatedText"]
    assert batch["translatedText"] == [english, explicit["translatedText"]]
    assert "detectedLanguage" not in explicit  # only for auto


def test_auto_without_detection_installed_is_400(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from server import detect as detection

    detection.clear_cache()
    monkeypatch.setitem(sys.modules, "py3langid", None)  # `import py3langid` now raises ImportError
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    try:
        r = _translate(client, json={"q": TEXTS[0], "source": "auto", "target": "fr"})
        assert r.status_code == 400
        assert detection.INSTALL_HINT in r.json()["error"]
    finally:
        monkeypatch.undo()
        detection.clear_cache()


def test_soft_prompt_applies(client: TestClient) -> None:
    import torch

    from engine.prompts import SoftPrompt

    torch.manual_seed(0)
    d_model = client.get("/info").json()["d_model"]
    prompt = SoftPrompt(prefix=torch.randn(3, d_model) * 0.5)
    files = {"file": ("p.safetensors", prompt.to_bytes(), "application/octet-stream")}
    assert client.post("/prompts", files=files, data={"id": "lt"}).status_code == 201
    fields = {"q": TEXTS[1], "source": "en", "target": "fr", "api_key": KEY}
    with_prompt = client.post("/translate", json={**fields, "prompt_id": "lt"})
    assert with_prompt.status_code == 200, with_prompt.text
    body = {"inputs": TEXTS[1], "parameters": {"src_lang": "eng_Latn", "tgt_lang": "fra_Latn", "prompt_id": "lt"}}
    generated = client.post("/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert with_prompt.json()["translatedText"] == generated["generated_text"]
    missing = client.post("/translate", json={**fields, "prompt_id": "nope"})
    assert missing.status_code == 400
    assert set(missing.json()) == {"error"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"source": "en", "target": "fr"}, "Invalid request: missing q parameter"),
        ({"q": "", "source": "en", "target": "fr"}, "Invalid request: missing q parameter"),
        ({"q": [], "source": "en", "target": "fr"}, "Invalid request: missing q parameter"),
        ({"q": ["a", ""], "source": "en", "target": "fr"}, "Invalid request: q has an empty text"),
        ({"q": "a", "target": "fr"}, "Invalid request: missing source parameter"),
        ({"q": "a", "source": "en"}, "Invalid request: missing target parameter"),
        ({"q": "a", "source": "en", "target": "fr", "format": "pdf"}, "pdf format is not supported"),
        ({"q": 3, "source": "en", "target": "fr"}, "q"),
    ],
)
def test_bad_input_is_400_with_error(client: TestClient, body: dict[str, object], message: str) -> None:
    r = _translate(client, json=body)
    assert r.status_code == 400
    assert set(r.json()) == {"error"}
    assert r.json()["error"].startswith(message)


def test_malformed_json_is_400(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = client.post("/translate", content=b"{not json", headers=headers)
    assert r.status_code == 400
    assert r.json() == {"error": "Invalid request: the body is not valid JSON"}


def test_other_routes_keep_their_error_shape(client: TestClient) -> None:
    r = client.post("/generate", json={"inputs": "x", "parameters": {"src_lang": "xx"}})
    assert r.status_code == 401
    assert set(r.json()) == {"error", "error_type"}


def test_list_is_submitted_as_one_batch(client: TestClient) -> None:
    records: list[StepRecord] = []
    client.app.state.ctx.engine.add_step_listener(records.append)  # type: ignore[attr-defined]
    r = _translate(client, json={"q": TEXTS * 2, "source": "en", "target": "de"})
    assert r.status_code == 200, r.text
    assert len(r.json()["translatedText"]) == len(TEXTS) * 2
    assert max(record.batch_size for record in records if record.phase == "decode") > 1
