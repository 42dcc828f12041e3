"""Reference for loramux's logits controls: transformers' logits processors (and OpenAI's
frequency/presence formula, which transformers has no processor for) applied to fixed random
logits and token histories, written to fixtures/sampler/processors.json.

Order as vLLM applies them: allowed tokens, bad words, min_tokens, logit_bias, repetition
penalty, then frequency/presence; min_p on logits divided by the temperature. A removed token
is written as null (-inf). Run with the reference venv's python:
    ~/.cache/loramux/reference-venv/bin/python scripts/reference/make_sampler_fixture.py
"""
import json
import os

import numpy as np
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
)

VOCAB = 48
EOS = 0
OUT = os.path.join(os.path.dirname(__file__), "../../fixtures/sampler/processors.json")


def controls(logits, prompt, output, p):
    """The logits after every control but temperature and min_p."""
    ids = torch.tensor([prompt + output])
    s = torch.tensor([logits], dtype=torch.float32)
    if p.get("allowed_token_ids") is not None:
        banned = [i for i in range(VOCAB) if i not in p["allowed_token_ids"]]
        s = SuppressTokensLogitsProcessor(banned, device="cpu")(ids, s)
    if p.get("bad_words_ids"):
        # loramux, like vLLM, matches a bad word's prefix against the generated tokens only;
        # every case generates at least as many tokens as the longest prefix.
        assert all(len(output) >= len(w) - 1 for w in p["bad_words_ids"])
        s = NoBadWordsLogitsProcessor(p["bad_words_ids"], eos_token_id=None)(ids, s)
    if p.get("min_tokens", 0) > 0:
        s = MinNewTokensLengthLogitsProcessor(len(prompt), p["min_tokens"], [EOS] + p.get("stop_token_ids", []))(ids, s)
    if p.get("logit_bias"):
        bias = [[[i], b] for i, b in p["logit_bias"]]
        s = SequenceBiasLogitsProcessor(bias)(ids, s)
    if p.get("repetition_penalty", 1.0) != 1.0:
        s = RepetitionPenaltyLogitsProcessor(p["repetition_penalty"])(ids, s)
    s = s[0].double().numpy()
    counts = np.bincount(np.array(output, dtype=np.int64), minlength=VOCAB)[:VOCAB]
    s = s - counts * p.get("frequency_penalty", 0.0) - (counts > 0) * p.get("presence_penalty", 0.0)
    return s


def min_p(logits, p):
    s = torch.tensor([logits], dtype=torch.float32)
    ids = torch.zeros((1, 1), dtype=torch.long)
    s = TemperatureLogitsWarper(p["temperature"])(ids, s)
    s = MinPLogitsWarper(p["min_p"])(ids, s)
    return s[0].double().numpy()


def cases():
    rng = np.random.default_rng(24)
    specs = [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7},
        {"frequency_penalty": 0.8},
        {"presence_penalty": -1.1},
        {"frequency_penalty": -0.5, "presence_penalty": 1.5},
        {"repetition_penalty": 1.8, "frequency_penalty": 0.3, "presence_penalty": 0.4},
        {"logit_bias": [[3, 100.0], [7, -100.0], [11, 2.5]]},
        {"logit_bias": [[5, -3.25]], "repetition_penalty": 1.2, "presence_penalty": 0.5},
        {"min_tokens": 9, "stop_token_ids": [4]},
        {"min_tokens": 2, "stop_token_ids": [4]},
        {"bad_words_ids": [[6], [9, 10], [12, 13, 14]]},
        {"allowed_token_ids": [1, 2, 3, 5, 8, 13, 21, 34]},
        {"allowed_token_ids": [0, 40, 41], "logit_bias": [[40, 1.0]], "repetition_penalty": 1.5},
        {"temperature": 0.7, "min_p": 0.05},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 1.6, "min_p": 0.5},
    ]
    out = []
    for i, p in enumerate(specs):
        logits = (rng.standard_normal(VOCAB) * 3.0).astype(np.float32).tolist()
        prompt = rng.integers(0, VOCAB, size=12).tolist()
        output = rng.integers(0, VOCAB, size=5).tolist()
        if p.get("bad_words_ids"):
            output = output[:-2] + [12, 13]  # the three-token word's prefix was just generated
        if "min_p" in p:
            expected = min_p(logits, p)
        else:
            expected = controls(logits, prompt, output, p)
        expected = [None if np.isinf(x) and x < 0 else float(x) for x in expected]
        out.append({"case": i, "params": p, "logits": logits, "prompt": prompt, "output": output, "eos": [EOS], "expected": expected})
    return out


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c) for c in cases()) + "\n]\n")
    print(os.path.normpath(OUT))


if __name__ == "__main__":
    main()
