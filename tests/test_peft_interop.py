"""PEFT prompt-tuning adapters in cpm2, against PEFT itself as the reference.

A prompt trained with PEFT on a tiny random HF T5 / Switch model and uploaded through `POST /prompts`
makes the converted model generate exactly PEFT's greedy tokens; a cpm2 prompt exported with
`GET /prompts/{id}/file?format=peft` loads with `PeftModel.from_pretrained` and generates what cpm2
does; `cpm2 generate --prompt <adapter dir>` agrees; foreign or malformed adapters get a 4xx and leave
the store unchanged. Also pins down the PEFT behaviour the mapping relies on: the decoder half of a
seq2seq prompt is never trained and never changes generation.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HF_CASES, HF_COMMON, save_hf_model
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from server_fakes import local_client

from cpm2.cli import main as cpm2_main
from engine.peft import peft_from_soft_prompt, read_peft_dir, soft_prompt_from_peft
from engine.prompts import PromptError, SoftPrompt
from engine.serving.engine import AsyncEngine, EngineConfig
from engine.tokenizer import SentencePieceTokenizer, train_sentencepiece
from engine.weights.convert import convert_hf
from server.app import create_app
from server.settings import Settings

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NUM_VIRTUAL_TOKENS = 8
MAX_NEW_TOKENS = 12
EOS = HF_COMMON["eos_token_id"]
TEXTS = ["the quick brown fox", "hello world", "summarize: a cat sat on the mat", "jumps over 3 times"]
CORPUS = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(40)] + [
    "translate english to german: hello world",
    "summarize: a cat sat on the mat",
]


@dataclass
class Served:
    """One HF model, a PEFT prompt trained on it, and a cpm2 server on its conversion."""

    name: str
    tokenizer: SentencePieceTokenizer
    hf_dir: Path
    native_dir: Path
    adapter_dir: Path
    peft_model: Any
    client: TestClient


def _build_hf(name: str, vocab_size: int) -> Any:
    # conftest's cases, with the vocabulary the test tokenizer needs: cpm2 never samples an id the
    # tokenizer cannot decode, so the two vocabularies must agree for greedy ids to be comparable.
    model_cls, config_cls, kwargs = HF_CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**HF_COMMON, "vocab_size": vocab_size}, **kwargs)
    return getattr(transformers, model_cls)(config).eval()


def _train_prompt(hf: Any, tokenizer: SentencePieceTokenizer) -> Any:
    """PEFT prompt tuning on a toy task (answer every input with one fixed text), a few CPU steps."""
    config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    model = peft.get_peft_model(hf, config)
    weight = model.prompt_encoder["default"].embedding.weight
    initial = weight.detach().clone()
    inputs = [tokenizer.encode(text) for text in CORPUS[::8]]
    width = max(map(len, inputs))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in inputs])
    mask = (torch.arange(width) < torch.tensor([[len(row)] for row in inputs])).long()
    labels = torch.tensor([tokenizer.encode("lazy dog")] * len(inputs))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    model.train()
    torch.manual_seed(1)
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # What the cpm2 mapping relies on (engine/peft.py): PEFT trains only the encoder half.
    assert not torch.equal(weight[:NUM_VIRTUAL_TOKENS], initial[:NUM_VIRTUAL_TOKENS])
    assert torch.equal(weight[NUM_VIRTUAL_TOKENS:], initial[NUM_VIRTUAL_TOKENS:])
    return model


def _peft_generate_with_logprobs(model: Any, ids: list[int]) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens (up to and including EOS) and the log-probability of each."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0].tolist()[1:]  # drop the decoder start token
    tokens = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=False)]
    return tokens, logprobs


def _peft_generate(model: Any, ids: list[int]) -> list[int]:
    return _peft_generate_with_logprobs(model, ids)[0]


def _cpm2_generate_with_logprobs(client: TestClient, text: str, prompt_id: str | None) -> tuple[list[int], list[float]]:
    parameters = {"max_new_tokens": MAX_NEW_TOKENS, "details": True, "prompt_id": prompt_id}
    r = client.post("/generate", json={"inputs": text, "parameters": parameters})
    assert r.status_code == 200, r.text
    tokens = r.json()["details"]["tokens"]
    return [t["id"] for t in tokens], [t["logprob"] for t in tokens]


def _cpm2_generate(client: TestClient, text: str, prompt_id: str | None) -> list[int]:
    return _cpm2_generate_with_logprobs(client, text, prompt_id)[0]


def _assert_same_generation(client: TestClient, prompt_id: str, model: Any, tokenizer: SentencePieceTokenizer) -> None:
    """Identical greedy ids, and logprobs within float32 rounding: random tiny models often repeat one
    token, so the logprobs are what would show a virtual token placed or scaled differently."""
    for text in TEXTS:
        ids, logprobs = _cpm2_generate_with_logprobs(client, text, prompt_id)
        expected_ids, expected_logprobs = _peft_generate_with_logprobs(model, tokenizer.encode(text))
        assert ids == expected_ids, text
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4), text


def _upload_peft(client: TestClient, prompt_id: str, config: bytes, weights: bytes) -> Any:
    files = {
        "file": ("adapter_model.safetensors", weights, "application/octet-stream"),
        "adapter_config": ("adapter_config.json", config, "application/json"),
    }
    return client.post("/prompts", files=files, data={"id": prompt_id})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spm")
    train_sentencepiece(CORPUS, path / "spiece.model", vocab_size=50, byte_fallback=False)
    return path


@pytest.fixture(scope="module")
def served(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Served]]:
    """`served(name)`: built on first use, shared by the module's tests."""
    cache: dict[str, Served] = {}
    with ExitStack() as stack:

        def get(name: str) -> Served:
            if name not in cache:
                root = tmp_path_factory.mktemp(name)
                tokenizer = SentencePieceTokenizer(tokenizer_dir / "spiece.model")
                hf = _build_hf(name, tokenizer.vocab_size)
                save_hf_model(hf, root / "hf")
                (root / "hf" / "spiece.model").write_bytes((tokenizer_dir / "spiece.model").read_bytes())
                convert_hf(root / "hf", root / "native")
                model = _train_prompt(hf, tokenizer)
                model.save_pretrained(root / "adapter")
                engine = AsyncEngine.from_config(EngineConfig(model=root / "native", max_batch_size=8))
                settings = Settings(
                    prompt_store=root / "store", max_input_tokens=256, max_total_tokens=512, allow_local_admin=True
                )
                client = stack.enter_context(local_client(create_app(settings, engine)))
                cache[name] = Served(name, tokenizer, root / "hf", root / "native", root / "adapter", model, client)
            return cache[name]

        yield get


@pytest.mark.parametrize("name", ["t5-v1.1", "switch-4e-step2"])
def test_uploaded_peft_prompt_generates_like_peft(served: Callable[[str], Served], name: str) -> None:
    s = served(name)
    config = (s.adapter_dir / "adapter_config.json").read_bytes()
    assert json.loads(config)["num_transformer_submodules"] == 2
    weights = (s.adapter_dir / "adapter_model.safetensors").read_bytes()
    r = _upload_peft(s.client, "peft", config, weights)
    assert r.status_code == 201, r.text
    assert r.json()["num_virtual_tokens"] == {"prefix": NUM_VIRTUAL_TOKENS}
    _assert_same_generation(s.client, "peft", s.peft_model, s.tokenizer)
    # The prompt matters: without it the base model says something else.
    expected = [_peft_generate(s.peft_model, s.tokenizer.encode(text)) for text in TEXTS]
    assert [_cpm2_generate(s.client, text, None) for text in TEXTS] != expected
    # The stored file is cpm2's format and says what happened to the decoder half.
    stored = s.client.get("/prompts/peft/file").content
    assert set(load_safetensors(stored)) == {"prefix"}
    assert (
        "dropped"
        in json.loads(stored[8 : 8 + int.from_bytes(stored[:8], "little")])["__metadata__"]["peft_decoder_prompt"]
    )


def test_peft_ignores_the_decoder_half(served: Callable[[str], Served]) -> None:
    s = served("t5-v1.1")
    ids = s.tokenizer.encode(TEXTS[0])
    before = _peft_generate(s.peft_model, ids)
    weight = s.peft_model.prompt_encoder["default"].embedding.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[NUM_VIRTUAL_TOKENS:] = torch.randn_like(weight[NUM_VIRTUAL_TOKENS:]) * 10
        assert _peft_generate(s.peft_model, ids) == before
        weight.copy_(saved)


def test_exported_prompt_loads_in_peft_and_generates_alike(served: Callable[[str], Served], tmp_path: Path) -> None:
    s = served("t5-v1.1")
    torch.manual_seed(2)
    prompt = SoftPrompt(prefix=torch.randn(5, HF_COMMON["d_model"]))
    files = {"file": ("p.safetensors", prompt.to_bytes(), "application/octet-stream")}
    assert s.client.post("/prompts", files=files, data={"id": "native"}).status_code == 201
    r = s.client.get("/prompts/native/file", params={"format": "peft"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert s.client.get("/prompts/native/file", params={"format": "peft"}).content == r.content  # reproducible
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "adapter")
    base = transformers.T5ForConditionalGeneration.from_pretrained(s.hf_dir).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert type(loaded).__name__ == "PeftModelForSeq2SeqLM"
    _assert_same_generation(s.client, "native", loaded, s.tokenizer)


def test_peft_round_trip_keeps_the_encoder_rows(served: Callable[[str], Served]) -> None:
    s = served("t5-v1.1")
    config = (s.adapter_dir / "adapter_config.json").read_bytes()
    weights = (s.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert _upload_peft(s.client, "round-trip", config, weights).status_code == 201
    archive = zipfile.ZipFile(io.BytesIO(s.client.get("/prompts/round-trip/file?format=peft").content))
    exported = load_safetensors(archive.read("adapter_model.safetensors"))["prompt_embeddings"]
    original = load_safetensors(weights)["prompt_embeddings"]
    assert torch.equal(exported, original[:NUM_VIRTUAL_TOKENS])
    assert json.loads(archive.read("adapter_config.json"))["num_transformer_submodules"] == 1


def test_cli_accepts_a_peft_directory(served: Callable[[str], Served], capsys: pytest.CaptureFixture[str]) -> None:
    s = served("t5-v1.1")
    argv = ["generate", "--model", str(s.native_dir), "--prompt", str(s.adapter_dir), "--json"]
    assert cpm2_main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), *TEXTS]) == 0
    got = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert got == [_peft_generate(s.peft_model, s.tokenizer.encode(text)) for text in TEXTS]


# ---- hostile adapters ------------------------------------------------------------------------


def _adapter(s: Served, *, rows: int | None = None, width: int | None = None, **config: object) -> tuple[bytes, bytes]:
    base = json.loads((s.adapter_dir / "adapter_config.json").read_bytes())
    embeddings = torch.randn(rows or 2 * NUM_VIRTUAL_TOKENS, width or HF_COMMON["d_model"])
    return json.dumps({**base, **config}).encode(), save_safetensors({"prompt_embeddings": embeddings})


@pytest.mark.parametrize(
    ("build", "status", "message"),
    [
        (lambda s: _adapter(s, peft_type="LORA", r=8, target_modules=["q", "v"]), 422, "'LORA' is not supported"),
        (lambda s: _adapter(s, peft_type="P_TUNING"), 422, "only PROMPT_TUNING"),
        (lambda s: _adapter(s, peft_type="PREFIX_TUNING"), 422, "'PREFIX_TUNING'"),
        (lambda s: _adapter(s, task_type="CAUSAL_LM"), 422, "SEQ_2_SEQ_LM"),
        (lambda s: _adapter(s, width=48, token_dim=48), 422, "d_model is 32"),
        (lambda s: _adapter(s, rows=10), 422, "says 16 rows"),
        (lambda s: _adapter(s, num_virtual_tokens=0), 422, "positive integer"),
        (lambda s: (b"{not json", _adapter(s)[1]), 422, "not valid JSON"),
        (lambda s: (b"x" * 70_000, _adapter(s)[1]), 413, "limit"),
        (lambda s: (_adapter(s)[0], _pickle({"prompt_embeddings": torch.randn(16, 32)})), 415, "adapter_model.bin"),
        (lambda s: (_adapter(s)[0], save_safetensors({"prefix": torch.randn(16, 32)})), 422, "prompt_embeddings"),
    ],
    ids=["lora", "p-tuning", "prefix-tuning", "causal", "width", "rows", "zero", "json", "big", "pickle", "keys"],
)
def test_bad_adapters_are_refused_and_store_unchanged(
    served: Callable[[str], Served], build: Callable[[Served], tuple[bytes, bytes]], status: int, message: str
) -> None:
    s = served("t5-v1.1")
    before = s.client.get("/prompts").json()["data"]
    r = _upload_peft(s.client, "hostile", *build(s))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert s.client.get("/prompts").json()["data"] == before


def test_adapter_weights_without_config_are_refused(served: Callable[[str], Served]) -> None:
    s = served("t5-v1.1")
    weights = (s.adapter_dir / "adapter_model.safetensors").read_bytes()
    files = {"file": ("adapter_model.safetensors", weights, "application/octet-stream")}
    r = s.client.post("/prompts", files=files, data={"id": "no-config"})
    assert r.status_code == 422
    assert "adapter_config.json" in r.json()["error"]
    assert s.client.get("/prompts/no-config").status_code == 404


def _pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---- the converter alone -----------------------------------------------------------------------


def test_encoder_only_adapter_becomes_the_whole_prefix() -> None:
    rows = torch.randn(4, 16)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4}
    prompt = soft_prompt_from_peft({**config, "num_transformer_submodules": 1}, {"prompt_embeddings": rows}, d_model=16)
    assert prompt.prefix is not None
    assert torch.equal(prompt.prefix, rows)
    assert "peft_decoder_prompt" not in prompt.metadata


def test_only_a_pure_prefix_exports() -> None:
    config, tensors = peft_from_soft_prompt(SoftPrompt(prefix=torch.randn(3, 16, dtype=torch.bfloat16)))
    assert tensors["prompt_embeddings"].dtype == torch.float32
    assert (config["num_virtual_tokens"], config["token_dim"]) == (3, 16)
    with pytest.raises(PromptError, match="infix") as excinfo:
        peft_from_soft_prompt(SoftPrompt(prefix=torch.randn(3, 16), infix=torch.randn(1, 16)))
    assert excinfo.value.problem == "shape"


def test_adapter_directory_problems(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=r"no adapter_config\.json") as excinfo:
        read_peft_dir(tmp_path, d_model=16)
    assert excinfo.value.problem == "config"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    (tmp_path / "adapter_model.bin").write_bytes(_pickle({"prompt_embeddings": torch.randn(2, 16)}))
    with pytest.raises(PromptError, match="safe_serialization=True") as excinfo:
        read_peft_dir(tmp_path / "adapter_config.json", d_model=16)
    assert excinfo.value.problem == "format"
