"""CTranslate2 in its own process, driven over stdin/stdout by `bench.decode_vs_ct2.Ct2System`.

Why a process: CTranslate2's wheel links its own libgomp, but torch loads libgomp into the global
symbol scope first, so in one process CTranslate2's OpenMP calls land in torch's runtime and start a
second thread team in it. From the first CTranslate2 call on, libgomp manages more threads than the
machine has cores and stops spinning between parallel regions: every later torch kernel pays a
futex wake-up. Measured on a 2-core Xeon: `_weight_int8pack_mm` on a 4096x1024 weight at one row
went from 114 to 181 us, oneDNN's float32 GEMV from 387 to 444 us, and cpm2's int8 decode of
t5-v1_1-base from 59 to 41 tok/s, for the rest of the process. Each system in its own process, as
each is deployed, removes the interference.

Protocol: one JSON line per request, `{"prompts": [[id, ...], ...], "num_tokens": N}`; one JSON line
per reply, `{"tokens": [[id, ...], ...]}` or `{"error": "..."}`. Token ids map to the word-level
vocabulary `token_string` names (the converted model's vocabulary).

Run by the benchmark as `python -m bench.ct2_worker PATH COMPUTE_TYPE THREADS VOCAB_SIZE`.
"""

from __future__ import annotations

import json
import sys

#: T5's special ids: pad (also the decoder start), end of sequence, unknown.
PAD, EOS, UNK = 0, 1, 2


def token_string(i: int) -> str:
    """The vocabulary entry of id `i` in the benchmark's word-level vocabulary."""
    return {PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}.get(i, f"t{i}")


def serve(path: str, compute_type: str, threads: int, vocab_size: int) -> None:
    import ctranslate2

    translator = ctranslate2.Translator(
        path, device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=threads
    )
    ids = {token_string(i): i for i in range(vocab_size)}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            results = translator.translate_batch(
                [[token_string(i) for i in p] for p in request["prompts"]],
                beam_size=1,
                max_decoding_length=request["num_tokens"],
                min_decoding_length=request["num_tokens"],
                max_batch_size=0,
            )
            reply = {"tokens": [[ids[t] for t in r.hypotheses[0]] for r in results]}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    model_path, compute, num_threads, vocab = sys.argv[1:5]
    serve(model_path, compute, int(num_threads), int(vocab))
