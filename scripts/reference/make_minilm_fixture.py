"""Reference sentence embeddings of all-MiniLM-L6-v2 (the `--router-model` router) from
transformers, computed as sentence-transformers computes them (modules.json: Transformer,
mean Pooling over the attention mask, Normalize), for `crates/engine/tests/sentence_embedder.rs`.

Usage: python make_minilm_fixture.py --model DIR --out fixtures/real/all-minilm-l6-v2.json
(DIR: the folder `loramux models pull all-minilm-l6-v2` writes.)"""
import argparse
import json

import torch
from transformers import AutoModel, AutoTokenizer

TEXTS = [
    "Write a SQL query that lists every customer in Paris.",
    "Is this review positive or negative? The battery died after a day.",
    "Convert 12 March 2021 to ISO format.",
    "a",
    # longer than max_seq_length (256 word pieces): checks the truncation
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    max_len = json.load(open(f"{args.model}/sentence_bert_config.json"))["max_seq_length"]
    cases = []
    for text in TEXTS:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=max_len)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        mask = enc["attention_mask"][0].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(0) / mask.sum()
        normalized = torch.nn.functional.normalize(pooled, dim=0)
        cases.append({"text": text, "ids": enc["input_ids"][0].tolist(), "embedding": [round(x, 6) for x in normalized.tolist()]})
    json.dump({"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": max_len, "cases": cases}, open(args.out, "w"))


if __name__ == "__main__":
    main()
