"""LibreTranslate's `POST /detect`, with the real language-identification library (py3langid).

Over HTTP: a uvicorn server on the tiny NLLB-200-shaped model tests/test_translate_api.py builds
(all 202 NLLB codes), driven by LibreTranslate's own client, `libretranslatepy`. In-process: the
bodies LibreTranslate accepts, the API key, a model that lacks languages (a fake engine with a few
NLLB codes), the not-installed path, and that detection runs in the worker pool.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi.testclient import TestClient
from libretranslatepy import LibreTranslateAPI
from server_fakes import FakeEngine, local_client
from server_process import serve_in_thread

# The tiny NLLB model fixture is test_translate_api's (imported, pytest builds it once for this module).
from test_translate_api import KEY, _engine, _settings, model_dir  # noqa: F401

from server import detect as detection
from server.app import create_app
from server.settings import Settings

T = TypeVar("T")

#: Clear sentences and the code LibreTranslate answers for each.
SENTENCES = {
    "en": "The weather is lovely today and we are going to the park.",
    "fr": "Il fait très beau aujourd'hui et nous allons au parc.",
    "de": "Das Wetter ist heute wunderschön und wir gehen in den Park.",
    "es": "Hoy hace un tiempo precioso y vamos al parque.",
    "ru": "Сегодня прекрасная погода, и мы идём в парк.",
    "ja": "今日はとても良い天気なので、公園に行きます。",
    "ko": "오늘은 날씨가 정말 좋아서 공원에 갑니다.",
    "ar": "الطقس جميل اليوم وسنذهب إلى الحديقة.",
    "hi": "आज मौसम बहुत अच्छा है और हम पार्क जा रहे हैं।",
    "pt": "O tempo está ótimo hoje e vamos ao parque.",
    "zh-Hans": "今天天气很好，我们去公园散步。",
    "zh-Hant": "今天天氣很好，我們去公園散步。",
}


@pytest.fixture(scope="module")
def base_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    app = create_app(_settings(tmp_path_factory.mktemp("store")), _engine(model_dir))
    with serve_in_thread(app) as url:
        yield url


def _http_error(exc: pytest.ExceptionInfo[urllib.error.HTTPError]) -> tuple[int, dict[str, object]]:
    return exc.value.code, json.loads(exc.value.read())


# ---- the real client, over HTTP ---------------------------------------------------------------


@pytest.mark.parametrize(("language", "text"), SENTENCES.items())
def test_client_detects_the_language(base_url: str, language: str, text: str) -> None:
    detections = LibreTranslateAPI(base_url, api_key=KEY).detect(text, timeout=60)
    assert detections[0]["language"] == language
    assert set(detections[0]) == {"confidence", "language"}
    assert 50 < detections[0]["confidence"] <= 100
    confidences = [d["confidence"] for d in detections]
    assert confidences == sorted(confidences, reverse=True)


def test_detected_codes_are_the_languages_codes(base_url: str) -> None:
    codes = {entry["code"] for entry in httpx.get(f"{base_url}/languages").json()}
    for text in SENTENCES.values():
        r = httpx.post(f"{base_url}/detect", json={"q": text, "api_key": KEY}, timeout=60)
        assert {d["language"] for d in r.json()} <= codes


def test_client_needs_the_key(base_url: str) -> None:
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            LibreTranslateAPI(base_url, api_key=key).detect(SENTENCES["en"], timeout=60)
        status, body = _http_error(exc)
        assert status == 403
        assert "API key" in str(body["error"])
    header = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{base_url}/detect", data={"q": SENTENCES["de"]}, headers=header, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()[0]["language"] == "de"


# ---- in-process: bodies, offered languages, errors, the worker pool ---------------------------


def _client(tmp_path: Path, languages: tuple[str, ...], **overrides: Any) -> TestClient:
    settings = Settings(prompt_store=tmp_path / "prompts", **overrides)
    return local_client(create_app(settings, FakeEngine(languages=languages)))


ENG_DEU_SPA = ("eng_Latn", "deu_Latn", "spa_Latn")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path, ("eng_Latn", "fra_Latn", "deu_Latn", "zho_Hans", "zho_Hant")) as c:
        yield c


def test_json_form_and_multipart_bodies_agree(client: TestClient) -> None:
    fields = {"q": SENTENCES["fr"]}
    as_json = client.post("/detect", json=fields)
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()[0]["language"] == "fr"
    assert client.post("/detect", data=fields).json() == as_json.json()
    assert client.post("/detect", files={"q": (None, SENTENCES["fr"])}).json() == as_json.json()


def test_a_list_is_answered_together(client: TestClient) -> None:
    # As LibreTranslate: one list of candidates for all the texts, weighted by their length.
    texts = [SENTENCES["de"], SENTENCES["de"], "Hello there."]
    r = client.post("/detect", json={"q": texts})
    assert r.status_code == 200, r.text
    assert r.json()[0]["language"] == "de"
    assert {"de", "en"} <= {d["language"] for d in r.json()}
    repeated = client.post("/detect", data={"q": texts})
    assert repeated.json() == r.json()


def test_only_the_models_languages_are_answered(tmp_path: Path) -> None:
    with _client(tmp_path, ENG_DEU_SPA) as c:
        r = c.post("/detect", json={"q": SENTENCES["fr"]})
        assert r.status_code == 200, r.text
        assert {d["language"] for d in r.json()} <= {"en", "de", "es"}
        assert sum(d["confidence"] for d in r.json()) <= 100.01


def test_chinese_script_decides_the_variant(client: TestClient, tmp_path: Path) -> None:
    assert client.post("/detect", json={"q": SENTENCES["zh-Hans"]}).json()[0]["language"] == "zh-Hans"
    assert client.post("/detect", json={"q": SENTENCES["zh-Hant"]}).json()[0]["language"] == "zh-Hant"
    with _client(tmp_path, ("eng_Latn", "zho_Hans")) as c:  # a model with one variant answers it
        assert c.post("/detect", json={"q": SENTENCES["zh-Hant"]}).json()[0]["language"] == "zh-Hans"


def test_text_without_evidence_is_the_first_language_at_zero(client: TestClient) -> None:
    # LibreTranslate's answer when nothing is detected: English (here the model's first) at 0.
    assert client.post("/detect", json={"q": "123"}).json() == [{"confidence": 0.0, "language": "en"}]


def test_api_key_in_body_or_header(tmp_path: Path) -> None:
    with _client(tmp_path, ENG_DEU_SPA, api_key=KEY) as c:
        missing = c.post("/detect", json={"q": SENTENCES["en"]})
        assert missing.status_code == 403
        assert set(missing.json()) == {"error"}
        assert c.post("/detect", json={"q": SENTENCES["en"], "api_key": KEY}).status_code == 200
        assert c.post("/detect", data={"q": SENTENCES["en"], "api_key": KEY}).status_code == 200
        header = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/detect", json={"q": SENTENCES["en"]}, headers=header).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Invalid request: missing q parameter"),
        ({"q": ""}, "Invalid request: missing q parameter"),
        ({"q": []}, "Invalid request: missing q parameter"),
        ({"q": ["a", ""]}, "Invalid request: q has an empty text"),
        ({"q": "  \n "}, "q: the text is empty or only whitespace"),
        ({"q": ["hello there", " "]}, "q[1]: the text is empty or only whitespace"),
        ({"q": 3}, "q"),
    ],
)
def test_bad_input_is_400_with_error(client: TestClient, body: dict[str, object], message: str) -> None:
    r = client.post("/detect", json=body)
    assert r.status_code == 400
    assert set(r.json()) == {"error"}
    assert r.json()["error"].startswith(message)


def test_a_model_without_table_languages_is_400(tmp_path: Path) -> None:
    with _client(tmp_path, ()) as c:
        r = c.post("/detect", json={"q": SENTENCES["en"]})
        assert r.status_code == 400
        assert "cannot detect" in r.json()["error"]


def test_not_installed_is_400_with_the_install_hint(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    detection.clear_cache()
    monkeypatch.setitem(sys.modules, "py3langid", None)  # `import py3langid` now raises ImportError
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    try:
        r = client.post("/detect", json={"q": SENTENCES["en"]})
        assert r.status_code == 400
        assert r.json() == {
            "error": "language detection is not installed on this server; install it with pip install 'cpm2[detect]'"
        }
        assert client.get("/languages").status_code == 200  # everything else is served
        with pytest.raises(detection.DetectionUnavailableError, match=r"cpm2\[detect\]"):
            detection.detect_languages(["hello"], model_codes=ENG_DEU_SPA)
    finally:
        detection.clear_cache()
    monkeypatch.undo()
    assert client.post("/detect", json={"q": SENTENCES["en"]}).json()[0]["language"] == "en"


def test_detection_runs_in_the_worker_pool(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    service = client.app.state.ctx.service  # type: ignore[attr-defined]
    pool_off_loop = service.off_loop
    threads: dict[str, int] = {}

    async def recording_off_loop(call: Callable[[], T]) -> T:
        threads["loop"] = threading.get_ident()

        def in_worker() -> T:
            threads["call"] = threading.get_ident()
            return call()

        result: Awaitable[T] = pool_off_loop(in_worker)
        return await result

    monkeypatch.setattr(service, "off_loop", recording_off_loop)
    r = client.post("/detect", json={"q": SENTENCES["de"]})
    assert r.status_code == 200, r.text
    assert r.json()[0]["language"] == "de"
    assert threads["call"] != threads["loop"]


def test_detect_languages_per_text() -> None:
    # The function `source: "auto"` will call: one answer per text, each best first.
    codes = ("eng_Latn", "fra_Latn", "rus_Cyrl", "nob_Latn")
    answers = detection.detect_languages(
        [SENTENCES["en"], SENTENCES["ru"], "Jeg leser denne boken hele uken."], model_codes=codes
    )
    assert [answer[0].language for answer in answers] == ["en", "ru", "nb"]  # py3langid's `no` is `nb`
    assert all(isinstance(d, detection.Detection) for answer in answers for d in answer)
