"""Newcomers' encoder passes run block by block between decode steps, within a share of a decode
step's time (`encoder_step_share`): the same encoder output and tokens as one whole pass, slices
interleaved with the running rows' decode steps, and a request cancelled while its pass is under
way never joins the batch."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.generation import GenerationRequest, Generator, SamplingParams
from engine.prompts import SoftPrompt
from engine.serving.loop import EngineLoop
from engine.serving.protocol import EngineRequest, StepRecord, TokenEvent
from engine.tokenizer import load_tokenizer
from engine.weights.loader import load_model


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> Generator:
    model, _ = load_model(tiny_model_dir)
    return Generator(model, load_tokenizer(tiny_model_dir))


def _inputs(generator: Generator, n: int) -> torch.Tensor:
    embeds = generator.model.embed(torch.randint(2, 200, (n, 7), generator=torch.Generator().manual_seed(0)))
    return embeds.detach()


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_an_encoder_pass_in_slices_equals_one_pass(generator: Generator, blocks: int) -> None:
    encoder = generator.model.encoder
    embeds_BSD = _inputs(generator, 3)
    valid_BS = torch.ones(3, 7, dtype=torch.bool)
    valid_BS[1, 5:] = False
    with torch.inference_mode():
        whole = generator.model.encode(embeds_BSD, valid_BS)
        state = encoder.begin(embeds_BSD, valid_BS)
        slices = 1
        while not encoder.advance(state, blocks):
            slices += 1
        sliced = encoder.finish(state)
    assert slices == -(-len(encoder.blocks) // blocks)
    assert torch.equal(sliced, whole)


def test_an_unfinished_pass_has_no_output(generator: Generator) -> None:
    encoder = generator.model.encoder
    state = encoder.begin(_inputs(generator, 1), torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=f"run 0 of {len(encoder.blocks)} blocks"):
        encoder.finish(state)


class _Client:
    """One request's events, as the server's sink would collect them."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.errors: list[Exception] = []
        self.first = threading.Event()
        self.done = threading.Event()

    def __call__(self, item: TokenEvent | Exception) -> None:
        if isinstance(item, Exception):
            self.errors.append(item)
            self.done.set()
            return
        self.events.append(item)
        self.first.set()
        if item.is_last:
            self.done.set()


def _request(generator: Generator, request_id: str, text: str, new_tokens: int, **extra: object) -> EngineRequest:
    assert generator.tokenizer is not None
    ids = tuple(generator.tokenizer.encode(text))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return EngineRequest(request_id=request_id, input_ids=ids, params=params, **extra)  # type: ignore[arg-type]


TEXTS = {"long": "a request decoding while others arrive", "b": "the second one", "c": "and a third, longer one"}


@pytest.mark.parametrize(
    ("share", "sliced"),
    [(1e-9, True), (0.0, False), (1e9, False)],
    ids=["a block per step", "0: whole pass", "share above any block"],
)
def test_newcomers_are_encoded_between_decode_steps_and_decode_as_alone(
    generator: Generator, share: float, sliced: bool
) -> None:
    prompt = SoftPrompt(prefix=torch.randn(4, generator.config.d_model, generator=torch.Generator().manual_seed(1)))
    alone = {
        name: generator.generate(
            [
                GenerationRequest(
                    _request(generator, name, text, 12).input_ids,
                    SamplingParams(max_new_tokens=12, ignore_eos=True),
                    prompt=prompt if name == "c" else None,
                )
            ]
        )[0].token_ids
        for name, text in TEXTS.items()
    }
    loop = EngineLoop(generator, max_running=8, max_waiting=8, encoder_step_share=share, special_ids=frozenset())
    records: list[StepRecord] = []
    loop.step_listeners.append(records.append)
    clients = {name: _Client() for name in TEXTS}
    loop.start()
    try:
        loop.submit(_request(generator, "long", TEXTS["long"], 12), clients["long"])
        assert clients["long"].first.wait(30)
        loop.submit(_request(generator, "b", TEXTS["b"], 12), clients["b"])
        loop.submit(_request(generator, "c", TEXTS["c"], 12, prompt=prompt), clients["c"])
        assert all(c.done.wait(60) for c in clients.values())
    finally:
        loop.stop()
        loop.join(10)
    for name, client in clients.items():
        assert not client.errors
        assert [e.token_id for e in client.events] == alone[name], name
    # The first request's pass ran whole (nothing was decoding); the newcomers' one block per step
    # between the first request's decode steps when no block fits the share, counting their tokens once.
    slices = len(generator.model.encoder.blocks) if sliced else 1
    encodes = [i for i, r in enumerate(records) if r.phase == "encode"]
    assert len(encodes) == 1 + slices
    newcomers = encodes[1:]
    assert all(records[i].batch_size == 2 for i in newcomers)
    assert [records[i].num_tokens > 0 for i in newcomers] == [True] + [False] * (slices - 1)
    assert all(records[i + 1].phase == "decode" for i in newcomers[:-1])  # a decode step after each slice


def test_a_request_cancelled_while_encoding_never_joins(generator: Generator) -> None:
    loop = EngineLoop(generator, max_running=8, max_waiting=8, encoder_step_share=1e-9, special_ids=frozenset())
    records: list[StepRecord] = []
    cancelled: list[bool] = []

    def cancel_mid_pass(record: StepRecord) -> None:
        records.append(record)
        if record.phase == "encode" and record.num_tokens and len(records) > 1 and not cancelled:
            loop.cancel("b")  # applied at the next step boundary, with b's pass under way
            cancelled.append(True)

    loop.step_listeners.append(cancel_mid_pass)
    clients = {name: _Client() for name in ("long", "b", "c")}
    loop.start()
    try:
        loop.submit(_request(generator, "long", TEXTS["long"], 12), clients["long"])
        assert clients["long"].first.wait(30)
        loop.submit(_request(generator, "b", TEXTS["b"], 12), clients["b"])
        loop.submit(_request(generator, "c", TEXTS["c"], 12), clients["c"])
        assert clients["long"].done.wait(60)
        assert clients["c"].done.wait(60)
    finally:
        loop.stop()
        loop.join(10)
    assert cancelled == [True]
    assert clients["b"].events == []
    assert len(clients["c"].events) == 12
    assert loop.stats.requests_cancelled == 1
    assert loop.stats.running == 0
    assert max(r.batch_size for r in records if r.phase == "decode") == 2  # long and c, never b


def test_a_negative_slice_is_refused(generator: Generator) -> None:
    with pytest.raises(ValueError, match="encoder_step_share must be >= 0"):
        EngineLoop(generator, max_running=1, max_waiting=1, encoder_step_share=-1.0, special_ids=frozenset())
