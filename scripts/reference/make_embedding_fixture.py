"""Reference for loramux's embedding requests (`/v1/embeddings`, `model` the base or an adapter):
transformers + peft's last decoder layer output (the residual stream before the final norm,
taken with a forward hook), mean-pooled without the first token, for the tiny llama model with
no adapter and with each of its PEFT adapters, written to fixtures/tiny/llama/embeddings.json.
Checked by the engine's `embedding_requests_match_peft` (to 1e-4) with the requests batched
together, chunked, beside generation. Run with the reference venv's python:
    ~/.cache/loramux/reference-venv/bin/python scripts/reference/make_embedding_fixture.py
"""
import json
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "../../fixtures/tiny/llama")
OUT = os.path.join(MODEL, "embeddings.json")
ADAPTERS = ["a", "b", "c", "d"]
# Token ids (no special tokens needed): lengths 1, 5 and 23 (longer than the test's prefill chunk).
PROMPTS = [[40], [40, 41, 42, 43, 44], [(7 * i + 3) % 300 + 20 for i in range(23)]]


def load(adapter):
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(MODEL, "adapters", adapter)) if adapter else base
    model.eval()
    return model


def pooled(model, ids):
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    kept = {}

    def hook(_module, _inputs, output):
        kept["h"] = output[0] if isinstance(output, tuple) else output

    handle = inner.model.layers[-1].register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    handle.remove()
    h = kept["h"][0].float()
    assert h.shape[0] == len(ids), h.shape
    return (h[1:] if len(ids) > 1 else h).mean(0).tolist()


def main():
    cases = []
    for adapter in [None] + ADAPTERS:
        model = load(adapter)
        for ids in PROMPTS:
            cases.append({"adapter": adapter, "prompt_ids": ids, "embedding": pooled(model, ids)})
    import peft
    import transformers

    doc = {
        "pooling": "mean of the last decoder layer's output (before the final norm) over positions 1.. (position 0 alone for one token)",
        "cases": cases,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
