#!/usr/bin/env python3
"""Golden fixture for a SentencePiece GGUF tokenizer: fixtures/tiny/spm/.

Run inside the reference venv (scripts/reference/setup-venv.sh):
    python scripts/reference/make_spm_fixture.py [--out fixtures/tiny/spm]

It writes
    tiny-spm.gguf   a 2-layer random Llama (hidden 16, float32) whose tokenizer is a SentencePiece
                    BPE model (byte_fallback) trained here on inline English text, stored under the
                    tokenizer.ggml.* keys the way llama.cpp's convert_hf_to_gguf.py writes an SPM
                    vocabulary (model "llama", pre "default", tokens/scores/token_type, no merges,
                    bos/eos/unk ids, add_bos_token true, add_eos_token false, chat_template)
    .gitignore      un-ignores the .gguf (the repo ignores *.gguf)
    expected.json   what transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir,
                    gguf_file=...)) gives for each text: ids with and without special tokens and
                    the decoded strings, one rendered chat, and the BPE merges it rebuilt from
                    the scores

The reference tokenizer is loaded from the GGUF written to disk. Everything is seeded; re-running
reproduces the files byte for byte.
"""
import argparse
import importlib.metadata
import io
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import sentencepiece as spm

import gguf
import tokenizers
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refutil import ENGLISH_CORPUS, dump_json  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SEED = 4000
VOCAB_SIZE = 512
GGUF_NAME = "tiny-spm.gguf"
# The last token, appended after the SentencePiece pieces the way convert_hf_to_gguf.py appends
# added_tokens.json entries: type USER_DEFINED, score -1000.
USER_DEFINED = "<tool>"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 2, 1
# Llama 2 / Mistral style.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

CORPUS = ENGLISH_CORPUS

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces  in    between",
    "   ",
    "",
    "line one\nline two\n\nline four",
    "\nstarts with a newline",
    "tab\tseparated\tvalues\t",
    "Numbers: 12345, 3.14 and 2024-06-01",
    "Punctuation!? (round) [square] {curly} <angle> \"quotes\" 'single' ~`@#$%^&*_+=|\\/",
    "xylophone zephyr quizzically jukebox",
    "café naïve über Grüße",
    "中文测试，你好世界",
    "emoji 🙂👍🏽 and ∑ ≠ ∞",
    "<s>Hello</s>",
    "Question?</s><s> Answer",
    "a</s>b <s> c",
    "<unk> stays text? <s",
    f"call {USER_DEFINED} now{USER_DEFINED}",
    "[INST] What is the capital of France? [/INST]",
]

CHATS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
]


def train_spm() -> bytes:
    """A SentencePiece BPE model with Llama's trainer options (byte fallback, digits split)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in CORPUS.strip().split("\n")]),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        seed_sentencepiece_size=1000,
        minloglevel=2,
    )
    return model.getvalue()


def spm_vocab(model: bytes) -> tuple[list[bytes], list[float], list[int]]:
    """tokens, scores, token types as gguf's SentencePieceVocab (= convert_hf_to_gguf.py) makes them."""
    with tempfile.TemporaryDirectory(prefix="loramux-spm-") as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model)
        vocab = gguf.SentencePieceVocab(pathlib.Path(tmp))
        entries = list(vocab.all_tokens())
    entries.append((USER_DEFINED.encode(), -1000.0, gguf.TokenType.USER_DEFINED))
    return [t for t, _, _ in entries], [s for _, s, _ in entries], [int(k) for _, _, k in entries]


def write_gguf(path: str, tokens: list[bytes], scores: list[float], types: list[int], sp) -> None:
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-spm")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(len(tokens))
    # convert_hf_to_gguf.py's _set_vocab_sentencepiece, then SpecialVocab.add_to_gguf.
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    head_dim = HIDDEN // HEADS

    def t(name, *shape, norm=False):
        x = 1.0 + 0.1 * rng.standard_normal(shape) if norm else 0.2 * rng.standard_normal(shape)
        w.add_tensor(name, x.astype(np.float32))

    t("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        t(f"blk.{i}.attn_norm.weight", HIDDEN, norm=True)
        t(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        t(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        t(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        t(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        t(f"blk.{i}.ffn_norm.weight", HIDDEN, norm=True)
        t(f"blk.{i}.ffn_gate.weight", INTERMEDIATE, HIDDEN)
        t(f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN)
        t(f"blk.{i}.ffn_down.weight", HIDDEN, INTERMEDIATE)
    t("output_norm.weight", HIDDEN, norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(path, 0o644)


def reference(out: str) -> dict:
    tok = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_NAME)
    cases = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        raw = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({
            "text": text,
            "ids": ids,
            "ids_no_special": raw,
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decoded_no_special": tok.decode(raw),
        })
    chats = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == ids
        chats.append({"messages": messages, "text": text, "ids": ids})
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert all(" " not in part for pair in merges for part in pair)
    byte_tokens = sum(1 for c in cases for i in c["ids"] if tok.convert_ids_to_tokens(i).startswith("<0x"))
    assert byte_tokens > 0, "no text exercised byte fallback"
    return {
        "gguf": GGUF_NAME,
        "seed": SEED,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "cases": cases,
        "chat": chats,
        "merges": [" ".join(pair) for pair in merges],
        "notes": [
            "ids = tokenizer(text)['input_ids'] (BOS added: add_bos_token true); ids_no_special = add_special_tokens=False",
            "decoded / decoded_skip_special = decode(ids) without / with skip_special_tokens; decoded_no_special = decode(ids_no_special)",
            "the GGUF has no tokenizer.ggml.merges (as llama.cpp writes SPM vocabularies): transformers rebuilds them from the scores; merges = the ones it built, best first, as 'left right'",
            f"{USER_DEFINED} is token_type 4 (user-defined): matched whole, not special",
            "chat: apply_chat_template(add_generation_prompt=True) text and its ids (add_special_tokens=False)",
        ],
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sentencepiece": spm.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "tiny", "spm"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    model = train_spm()
    sp = spm.SentencePieceProcessor(model_proto=model)
    tokens, scores, types = spm_vocab(model)
    write_gguf(os.path.join(out, GGUF_NAME), tokens, scores, types, sp)
    dump_json(reference(out), os.path.join(out, "expected.json"))
    # The repo ignores *.gguf; this one is committed.
    with open(os.path.join(out, ".gitignore"), "w", encoding="utf-8") as f:
        f.write(f"# The repo ignores *.gguf; this tiny one is a committed fixture ({os.path.basename(__file__)}).\n")
        f.write(f"!{GGUF_NAME}\n")
    os.chmod(os.path.join(out, ".gitignore"), 0o644)
    print(f"spm: {len(tokens)} tokens -> {out}")


if __name__ == "__main__":
    main()
