"""Request and response bodies: TGI's `/generate` schema and OpenAI's `/v1/completions`.

TGI's Python clients send every parameter they know, null when unset; each is accepted here, and
one cpm2 does not implement is refused (422) only when set to something other than its default.

Responses carry every field that TGI's OpenAPI document (huggingface/text-generation-inference
`docs/openapi.json`) and OpenAI's completion schema mark required, even where cpm2 has nothing to put
in it: the clients validate against those schemas (text-generation 0.7 refuses a `details` without
`prefill`), and tests/test_real_clients.py drives the server with them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    max_new_tokens: int | None = Field(None, gt=0, description="tokens to generate at most")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float | None = Field(None, ge=0, description="0 means greedy")
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling, (0, 1]")
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, description="stop sequences (kept in the output)")
    num_beams: int | None = Field(None, ge=1, le=16)
    details: bool = Field(False, description="return finish reason, tokens, logprobs, expert traffic")
    prompt_id: str | None = Field(
        None, validation_alias=AliasChoices("prompt_id", "adapter_id"), description="soft prompt to use"
    )
    text_pair: str | None = Field(None, description="second segment of two-part tasks (after the infix)")
    timeout_ms: int | None = Field(None, gt=0, description="deadline for the whole request")
    truncate: int | None = Field(None, gt=0, description="keep only the last N input tokens")
    ignore_eos: bool = Field(False, description="keep generating after the end-of-sequence token")
    src_lang: str | None = Field(None, description="translation models: language code of `inputs`, e.g. eng_Latn")
    tgt_lang: str | None = Field(None, description="translation models: language code to generate, e.g. fra_Latn")
    # Sent by TGI's clients; only their defaults are supported.
    best_of: int | None = None
    watermark: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    typical_p: float | None = None
    frequency_penalty: float | None = None
    return_full_text: bool | None = None
    grammar: Any | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> GenerateParameters:
        unsupported = {
            "best_of": self.best_of not in (None, 1),
            "watermark": self.watermark,
            "decoder_input_details": self.decoder_input_details,
            "top_n_tokens": self.top_n_tokens not in (None, 0),
            "typical_p": self.typical_p not in (None, 1.0),
            "frequency_penalty": self.frequency_penalty not in (None, 0.0),
            "return_full_text": bool(self.return_full_text),
            "grammar": self.grammar is not None,
        }
        used = [name for name, is_set in unsupported.items() if is_set]
        if used:
            raise ValueError(f"cpm2 does not support {', '.join(used)}; leave them unset")
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(..., min_length=1, description="the input text")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="POST / only: answer with server-sent events")


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class ResponseModel(BaseModel):
    """A response body that always sends every field, null or empty included: the OpenAPI document
    marks fields with defaults required too, as TGI's does (a client may rely on the key)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Token(ResponseModel):
    id: int
    text: str
    logprob: float
    special: bool


class PrefillToken(ResponseModel):
    """A decoder input token (TGI's `decoder_input_details`); the first has no logprob."""

    id: int
    text: str
    logprob: float | None


class ExpertDetails(ResponseModel):
    bytes_moved: float = 0
    hits: float = 0
    misses: float = 0


class Details(ResponseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = Field(None, description="the sampling seed (drawn when not given); null without sampling")
    # TGI always sends `prefill` and text-generation>=0.7 requires it. It lists the decoder input only
    # for `decoder_input_details`, which cpm2 refuses, so it is always empty.
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token]
    input_length: int = Field(0, description="encoder tokens, virtual tokens included")
    virtual_tokens: int = Field(0, description="soft-prompt tokens among input_length")
    experts: ExpertDetails = Field(default_factory=ExpertDetails)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body. TGI leaves `details` out unless asked for; the nulls inside it stay, since
        TGI's schema requires some nullable fields (a prefill token's `logprob`)."""
        return self.model_dump(exclude={"details"} if self.details is None else None)


class StreamDetails(ResponseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int
    virtual_tokens: int = 0
    experts: ExpertDetails = Field(default_factory=ExpertDetails)


class StreamResponse(ResponseModel):
    """One server-sent event; `generated_text` and `details` are null on every event but the last."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    text_pair: str | None = None
    prompt_id: str | None = None


# ---- OpenAI ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    # OpenAI adds options here over time; one a client sends that cpm2 does not know changes nothing
    # about the tokens, so it is ignored rather than refused.
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="end the stream with a chunk carrying `usage`")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="the base model name, or a soft prompt id")
    prompt: str | list[str] = Field(..., description="one input, or several (one choice each)")
    max_tokens: int | None = Field(16, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=1, description="0 or 1: the chosen token's logprob")
    user: str | None = None
    text_pair: str | None = None
    src_lang: str | None = Field(None, description="translation models: language code of `prompt`, e.g. eng_Latn")
    tgt_lang: str | None = Field(None, description="translation models: language code to generate, e.g. fra_Latn")
    # OpenAI fields with only the default supported.
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        unsupported = {
            "n": self.n != 1,
            "best_of": self.best_of not in (None, 1),
            "echo": self.echo,
            "suffix": self.suffix is not None,
            "presence_penalty": self.presence_penalty not in (None, 0.0),
            "frequency_penalty": self.frequency_penalty not in (None, 0.0),
            "logit_bias": bool(self.logit_bias),
        }
        used = [name for name, is_set in unsupported.items() if is_set]
        if used:
            raise ValueError(f"cpm2 does not support {', '.join(used)}; leave them unset")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


OpenAIFinishReason = Literal["stop", "length"]


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = Field(None, description="null on every streamed chunk but the last")


class CompletionUsage(ResponseModel):
    prompt_tokens: int = Field(..., description="encoder tokens, virtual tokens included")
    completion_tokens: int
    total_tokens: int
    virtual_tokens: int = Field(0, description="soft-prompt tokens among prompt_tokens (cpm2's)")


class Completion(ResponseModel):
    """`/v1/completions`: the answer, and each streamed chunk (OpenAI gives both one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    # Optional in OpenAI's schema but required in TGI's (its Completion and Chunk).
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = Field(
        None, description="null on streamed chunks, except the last one with stream_options.include_usage"
    )


class ErrorResponse(BaseModel):
    """Every error (TGI's body): what went wrong, said so the client knows what to change."""

    error: str
    error_type: str


class OpenAIError(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorResponse(BaseModel):
    """Errors on `/v1/*` (OpenAI's envelope), so OpenAI clients parse them."""

    error: OpenAIError


#: Declared on every route so the OpenAPI document describes the error bodies the server really
#: sends (FastAPI would otherwise document its own `{"detail": [...]}` for 422).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "the request cannot be served as sent"},
    "5XX": {"model": ErrorResponse, "description": "the server could not serve it now (503: retry)"},
}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OpenAIErrorResponse, "description": "the request cannot be served as sent"},
    "5XX": {"model": OpenAIErrorResponse, "description": "the server could not serve it now (503: retry)"},
}


# ---- LibreTranslate ----------------------------------------------------------------------------


#: Most alternative translations one text may ask for (each is one more beam to search).
MAX_ALTERNATIVES = 3


class TranslateRequest(BaseModel):
    """`POST /translate` (LibreTranslate's fields), from a JSON or a form body."""

    # LibreTranslate ignores fields it does not know (its web UI and clients send a few extra).
    model_config = ConfigDict(extra="ignore")

    q: str | list[str] = Field("", description="the text, or a list of texts (one batch)")
    source: str = Field(
        "", description="source language: `en`, `zh-Hans`, `pt-BR`, the model's `eng_Latn`, or `auto` to detect it"
    )
    target: str = Field("", description="target language, as `source`")
    format: str | None = Field(None, description="`text` (the default); `html` is not supported yet")
    alternatives: int = Field(
        0, description=f"extra translations to return (the next best beams), at most {MAX_ALTERNATIVES}"
    )
    api_key: str | None = Field(None, description="the API key, when the server requires one")
    prompt_id: str | None = Field(None, description="soft prompt to apply (cpm2's)")

    @model_validator(mode="after")
    def _libretranslate_checks(self) -> TranslateRequest:
        # LibreTranslate's own messages (and order) for missing or malformed fields.
        # PydanticCustomError keeps the message as it is (a ValueError gains "Value error, ").
        for name in ("q", "source", "target"):
            if not getattr(self, name):
                raise PydanticCustomError("missing", f"Invalid request: missing {name} parameter")
        if isinstance(self.q, list) and not all(self.q):
            raise PydanticCustomError("empty", "Invalid request: q has an empty text; leave empty texts out")
        if self.alternatives < 0:
            raise PydanticCustomError("range", "Invalid request: alternatives parameter must be >= 0")
        if self.alternatives > MAX_ALTERNATIVES:
            # LibreTranslate's message for its `--alternatives-limit` (3 by default).
            raise PydanticCustomError("range", f"Invalid request: alternatives parameter must be <= {MAX_ALTERNATIVES}")
        if self.format == "html":
            # Translating markup needs the tags kept out of the model's input; refused, never mangled.
            raise PydanticCustomError(
                "unsupported", "html format is not supported yet; send plain text with format=text"
            )
        if self.format not in (None, "", "text"):
            raise PydanticCustomError("unsupported", f"{self.format} format is not supported; use format=text")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.q] if isinstance(self.q, str) else list(self.q)


class DetectedLanguage(BaseModel):
    """A detected language (LibreTranslate's shape): `POST /detect`'s candidates, and
    `detectedLanguage` of `POST /translate` with `source: auto`."""

    confidence: float = Field(description="0 to 100")
    language: str = Field(description="LibreTranslate's code, as `GET /languages` lists it")


class TranslateResponse(BaseModel):
    translatedText: str | list[str]  # noqa: N815 (LibreTranslate's field name)
    alternatives: list[str] | list[list[str]] | None = Field(
        None, description="with `alternatives` > 0: the other translations, best first (a list per text for a list)"
    )
    detectedLanguage: DetectedLanguage | list[DetectedLanguage] | None = Field(  # noqa: N815 (LibreTranslate's)
        None, description="with `source: auto`: the language each text was translated from"
    )


class LanguageEntry(BaseModel):
    """One language of `GET /languages` (LibreTranslate's shape)."""

    code: str
    name: str
    targets: list[str]


class LibreTranslateError(BaseModel):
    """Errors on `/translate` and `/languages` (LibreTranslate's body)."""

    error: str


LIBRETRANSLATE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": LibreTranslateError, "description": "the request cannot be served as sent (400, 403, 429)"},
    "5XX": {"model": LibreTranslateError, "description": "the server could not serve it now"},
}
