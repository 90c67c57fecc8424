"""LibreTranslate's language codes and the NLLB-200 codes they stand for.

LibreTranslate clients send ISO 639-1 codes (`en`, `fr`) and a few variants (`zh-Hans`, `zh-Hant`,
`pt-BR`); NLLB-200's tokenizer knows `eng_Latn`, `zho_Hans`, `por_Latn`. The table below covers
every language LibreTranslate lists (its `/languages` on libretranslate.com, Argos Translate's
models) that NLLB-200 has, with the NLLB variety a LibreTranslate user means by the bare code (`ar`:
Modern Standard Arabic `arb_Arab`, `fa`: Western Persian `pes_Arab`, `ms`: Standard Malay
`zsm_Latn`, `sq`: Tosk Albanian `als_Latn`). A model's own codes (`eng_Latn`) are accepted as they
are; only codes the model has are offered or accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InputError


@dataclass(frozen=True)
class Language:
    code: str
    """LibreTranslate's code (`en`, `zh-Hans`)."""
    name: str
    """English name, as LibreTranslate's `/languages` gives it."""
    nllb: str
    """NLLB-200's code (`eng_Latn`)."""


LANGUAGES: tuple[Language, ...] = (
    Language("en", "English", "eng_Latn"),
    Language("sq", "Albanian", "als_Latn"),
    Language("ar", "Arabic", "arb_Arab"),
    Language("az", "Azerbaijani", "azj_Latn"),
    Language("eu", "Basque", "eus_Latn"),
    Language("bn", "Bengali", "ben_Beng"),
    Language("bg", "Bulgarian", "bul_Cyrl"),
    Language("ca", "Catalan", "cat_Latn"),
    Language("zh-Hans", "Chinese", "zho_Hans"),
    Language("zh-Hant", "Chinese (traditional)", "zho_Hant"),
    Language("cs", "Czech", "ces_Latn"),
    Language("da", "Danish", "dan_Latn"),
    Language("nl", "Dutch", "nld_Latn"),
    Language("eo", "Esperanto", "epo_Latn"),
    Language("et", "Estonian", "est_Latn"),
    Language("fi", "Finnish", "fin_Latn"),
    Language("fr", "French", "fra_Latn"),
    Language("gl", "Galician", "glg_Latn"),
    Language("de", "German", "deu_Latn"),
    Language("el", "Greek", "ell_Grek"),
    Language("he", "Hebrew", "heb_Hebr"),
    Language("hi", "Hindi", "hin_Deva"),
    Language("hu", "Hungarian", "hun_Latn"),
    Language("id", "Indonesian", "ind_Latn"),
    Language("ga", "Irish", "gle_Latn"),
    Language("it", "Italian", "ita_Latn"),
    Language("ja", "Japanese", "jpn_Jpan"),
    Language("ko", "Korean", "kor_Hang"),
    Language("ky", "Kyrgyz", "kir_Cyrl"),
    Language("lv", "Latvian", "lvs_Latn"),
    Language("lt", "Lithuanian", "lit_Latn"),
    Language("ms", "Malay", "zsm_Latn"),
    Language("nb", "Norwegian", "nob_Latn"),
    Language("fa", "Persian", "pes_Arab"),
    Language("pl", "Polish", "pol_Latn"),
    Language("pt", "Portuguese", "por_Latn"),
    Language("pt-BR", "Portuguese (Brazil)", "por_Latn"),
    Language("ro", "Romanian", "ron_Latn"),
    Language("ru", "Russian", "rus_Cyrl"),
    Language("sk", "Slovak", "slk_Latn"),
    Language("sl", "Slovenian", "slv_Latn"),
    Language("es", "Spanish", "spa_Latn"),
    Language("sv", "Swedish", "swe_Latn"),
    Language("tl", "Tagalog", "tgl_Latn"),
    Language("th", "Thai", "tha_Thai"),
    Language("tr", "Turkish", "tur_Latn"),
    Language("uk", "Ukrainian", "ukr_Cyrl"),
    Language("ur", "Urdu", "urd_Arab"),
)

#: Codes older LibreTranslate releases and their clients still send.
ALIASES: dict[str, str] = {"zh": "zh-Hans", "zt": "zh-Hant", "pb": "pt-BR"}

_BY_CODE = {language.code: language for language in LANGUAGES}


def offered(model_codes: Sequence[str]) -> list[Language]:
    """The table's languages the model has, in the table's order."""
    have = set(model_codes)
    return [language for language in LANGUAGES if language.nllb in have]


def to_nllb(code: str, model_codes: Sequence[str], *, field: str) -> str:
    """The model's code for LibreTranslate `code` (or the model's own code); InputError otherwise."""
    if code in model_codes:
        return code
    language = _BY_CODE.get(ALIASES.get(code, code))
    if language is not None and language.nllb in model_codes:
        return language.nllb
    if not model_codes:
        raise InputError(f"{field}: this model has no language codes; it cannot translate")
    raise InputError(f"{field}: {code} is not supported; GET /languages lists the codes this model has")
