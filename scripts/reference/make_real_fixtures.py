#!/usr/bin/env python3
"""Reference outputs of real models (loaded by transformers from GGUF, dequantized to float32).

Run inside the reference venv, after fetch-model.sh and train_example_adapters.py:
    python scripts/reference/make_real_fixtures.py [--out fixtures/real] [--only smollm2-135m]

Writes
    fixtures/real/smollm2-135m.json               tokenize / chat / greedy (base and adapters/pirate)
    fixtures/real/smollm2-135m.logits.safetensors last-position float32 logits of the France prompt:
                                                  keys "base", "pirate"  ([vocab])
    fixtures/real/qwen2.5-coder-0.5b.json         tokenize / chat / greedy (France prompt, base)
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file

import peft
import tokenizers
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch_model import MODELS, fetch  # noqa: E402
from refutil import dump_json  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FRANCE = "What is the capital of France? Answer in one word."
GREEDY_PROMPTS = [  # no digits anywhere
    FRANCE,
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
]
SMOL_FRANCE_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, 2]
MAX_NEW_TOKENS = 32

TOKENIZE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nline five\r\nend\n",
    "In 2026 we computed pi = 3.14159 and e = 2.71828; 1,000,000 > 999.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))",
    "fn main() {\n\tlet v: Vec<u8> = vec![1, 2, 3];\n}",
    "Unicode: caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \u0416\u0438\u0437\u043d\u044c \u0645\u0631\u062d\u0628\u0627 \U0001F600\U0001F680 \u2014 \u20ac5",
    "Punctuation!? (yes) [no] {maybe}; a:b, c-d_e \"quoted\" 'single' @#$%^&*~`|\\/<>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm sure you've heard they'll say it's DON'T shout",
    "",
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a primary color."},
    ],
    [{"role": "user", "content": FRANCE}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Write a haiku about the sea.\nKeep it short."},
    ],
]


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
    }


def chat_ids(tok, messages) -> list:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(out, list):
        out = out["input_ids"]
    return list(out)


def tokenize_cases(tok) -> list:
    cases = []
    for text in TOKENIZE_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    return cases


def chat_cases(tok) -> list:
    cases = []
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == chat_ids(tok, messages), messages
        cases.append({"messages": messages, "add_generation_prompt": True, "text": text, "ids": ids})
    return cases



def common_fields(name, gguf, tok):
    """The fields every real-model fixture starts with: provenance, tokenization, chat."""
    return {
        "model": name,
        "gguf": gguf,
        "gguf_sha256": MODELS[name]["sha256"],
        "loaded_as": "transformers from_pretrained(dir, gguf_file=..., dtype=float32): every tensor dequantized to float32",
        "versions": versions(),
        "digits_split_individually": digits_split(tok),
        "tokenize": tokenize_cases(tok),
        "chat": chat_cases(tok),
    }

def digits_split(tok) -> bool:
    ids = tok("2026 3.14159", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    return all(len(p.strip()) == 1 for p in digits)


@torch.no_grad()
def greedy(model, tok, question, eos):
    messages = [{"role": "user", "content": question}]
    ids = chat_ids(tok, messages)
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=eos,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    margins = []
    for step_logits in out.logits:
        top = torch.topk(step_logits[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return {
        "messages": messages,
        "prompt_ids": ids,
        "output_ids": new,
        "text": tok.decode(new, skip_special_tokens=True),
        "text_with_special": tok.decode(new, skip_special_tokens=False),
        "min_greedy_margin": min(margins),
    }


@torch.no_grad()
def last_logits(model, ids) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().contiguous()


def load(name):
    path = fetch(name)
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return tok, model, f


def smollm2(out_dir, adapters_dir):
    name = "smollm2-135m"
    tok, model, gguf = load(name)
    eos = 2
    result = {
        **common_fields(name, gguf, tok),
        "greedy": [],
        "notes": [
            "tokenize ids are tokenizer(text, add_special_tokens=False) with transformers' tokenizer built from the GGUF metadata",
            "decoded = decode(ids, skip_special_tokens=False)",
            "chat text = apply_chat_template(messages, add_generation_prompt=True); the template inserts its default system prompt when the first message is not a system message",
            "greedy: argmax, max_new_tokens 32, stops after eos id 2 (<|im_end|>), which is then included in output_ids; text = decode(output_ids, skip_special_tokens=True)",
            "adapter 'pirate' = adapters/pirate (float16 LoRA weights, applied unmerged by peft on the float32 model)",
        ],
    }
    logits = {}
    base_runs = []
    for q in GREEDY_PROMPTS:
        r = greedy(model, tok, q, eos)
        base_runs.append(dict(adapter=None, **r))
    france = base_runs[0]
    assert len(france["prompt_ids"]) == 42, len(france["prompt_ids"])
    assert france["output_ids"] == SMOL_FRANCE_ANSWER, france["output_ids"]
    logits["base"] = last_logits(model, france["prompt_ids"])

    pirate_dir = os.path.join(adapters_dir, "pirate")
    pm = PeftModel.from_pretrained(model, pirate_dir, adapter_name="pirate")
    pm.eval()
    pirate_runs = []
    for q in GREEDY_PROMPTS:
        r = greedy(pm, tok, q, eos)
        pirate_runs.append(dict(adapter="pirate", **r))
    logits["pirate"] = last_logits(pm, france["prompt_ids"])
    assert "Paris" in pirate_runs[0]["text"] and pirate_runs[0]["output_ids"] != SMOL_FRANCE_ANSWER
    for b, p in zip(base_runs, pirate_runs):
        result["greedy"] += [b, p]
    for r in result["greedy"]:
        print(f"  [{name} {r['adapter'] or 'base'}] {r['messages'][0]['content']!r} -> {r['text']!r} "
              f"(min margin {r['min_greedy_margin']:.3f})")

    dump_json(result, os.path.join(out_dir, f"{name}.json"))
    path = os.path.join(out_dir, f"{name}.logits.safetensors")
    save_file(logits, path, metadata={"format": "pt", "prompt": FRANCE})
    os.chmod(path, 0o644)
    print(f"  digits split individually: {result['digits_split_individually']}")


def qwen(out_dir):
    name = "qwen2.5-coder-0.5b"
    tok, model, gguf = load(name)
    eos = 151645
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    result = {
        **common_fields(name, gguf, tok),
        "greedy": [],
        "notes": [
            "tokenize ids are tokenizer(text, add_special_tokens=False) with transformers' tokenizer built from the GGUF metadata",
            "chat text = apply_chat_template(messages, add_generation_prompt=True) with no tools; the template inserts its default system prompt when the first message is not a system message",
            "greedy: argmax, max_new_tokens 32, stops after eos id 151645 (<|im_end|>), which is then included in output_ids",
        ],
    }
    r = greedy(model, tok, FRANCE, eos)
    assert r["text"] == "Paris" and r["output_ids"][-1] == eos, r
    result["greedy"].append(dict(adapter=None, **r))
    print(f"  [{name} base] {FRANCE!r} -> {r['text_with_special']!r} (min margin {r['min_greedy_margin']:.3f})")
    print(f"  digits split individually: {result['digits_split_individually']}")
    dump_json(result, os.path.join(out_dir, f"{name}.json"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "fixtures", "real"))
    ap.add_argument("--adapters", default=os.path.join(REPO, "adapters"))
    ap.add_argument("--only", choices=["smollm2-135m", "qwen2.5-coder-0.5b"], action="append")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    todo = args.only or ["smollm2-135m", "qwen2.5-coder-0.5b"]
    if "smollm2-135m" in todo:
        smollm2(args.out, args.adapters)
    if "qwen2.5-coder-0.5b" in todo:
        qwen(args.out)


if __name__ == "__main__":
    main()
