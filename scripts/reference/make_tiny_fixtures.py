#!/usr/bin/env python3
"""Golden fixtures for tiny random models: fixtures/tiny/{llama,qwen2,qwen3}/.

Run inside the reference venv (scripts/reference/setup-venv.sh):
    python scripts/reference/make_tiny_fixtures.py [--out fixtures/tiny] [--arch llama ...]

Per architecture it writes
    config.json, generation_config.json, model weights      (transformers 5 save_pretrained)
        llama: model.safetensors, float16
        qwen2: float32, two shards + model.safetensors.index.json
        qwen3: model.safetensors, bfloat16
    tokenizer.json, tokenizer_config.json (ChatML chat_template inside)
    adapters/{a,b,c,d}/adapter_config.json + adapter_model.safetensors  (PEFT format)
    expected.json, expected.safetensors, chat.json

Every reference output is computed from the model and adapters RELOADED from disk, with the
model in float32 (stored float16/bfloat16 weights are upcast), so the fixtures describe exactly
the stored weights. Everything is seeded; the script searches seeds until the smallest
top-1 minus top-2 logit margin along every recorded greedy path is >= MIN_MARGIN, so greedy
decoding never hinges on a near-tie.
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import peft
import tokenizers
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refutil import ENGLISH_CORPUS, dump_json  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
torch.use_deterministic_algorithms(True)

MIN_MARGIN = 1e-2
MAX_NEW_TOKENS = 8
VOCAB_SIZE = 384
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INIT_RANGE = 0.25
EMBED_STD = 0.6
PROMPT_LENGTHS = [5, 9, 13]
MIXED_LENGTH = 7
BASE_SEEDS = {"llama": 1000, "qwen2": 2000, "qwen3": 3000}

CORPUS = ENGLISH_CORPUS + 'fn main() { println!("hello, world"); } def add(a, b): return a + b\n'

# Token-id prompts are prefixes of these sentences (no special tokens).
PROMPT_TEXTS = [
    "The children played on the beach and the old people sat in the sun.",
    "A language model reads text one token at a time and predicts the next one.",
    "Once upon a time there was a small village by the sea, and every morning the boats went out.",
]
MIXED_TEXTS = [
    "The river flows from the mountains to the sea.",
    "She opened the window and looked at the rain.",
    "He wrote the code carefully and tested it twice.",
    "The river flows from the mountains to the sea.",  # same tokens as row 0, other adapter
]
MIXED_ADAPTERS = ["a", "b", "c", None]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "Tell me a story about a lazy dog."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "How are you today?"},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "And the weather?\nIs it raining?"},
    ],
]
TOKENIZE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand a tab",
    "line one\nline two\n\nline four\r\n",
    "Digits: 0 7 42 365 2026 3.14159",
    "Punctuation!? (yes) [no] {maybe}; a:b, c-d_e \"quoted\" 'single' @#$%^&*~`|\\/<>",
    "Unicode: caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \u0416\u0438\u0437\u043d\u044c \U0001F600 \u2014 \u20ac5",
    "special <|im_start|>user\nhi<|im_end|> and <|endoftext|>",
    "",
]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in CORPUS.strip().split("\n")] * 4
    tok.train_from_iterator(lines, trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    return tok


def write_tokenizer(tok: Tokenizer, out: str) -> None:
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIALS)
        },
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 512,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def chat_fixture(tokenizer) -> dict:
    chats = []
    for messages in CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        via = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if not isinstance(via, list):
            via = via["input_ids"]
        assert list(via) == ids, (via, ids)
        chats.append({"messages": messages, "add_generation_prompt": True, "text": text, "ids": ids})
    toks = []
    for text in TOKENIZE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        dec = tokenizer.decode(ids, skip_special_tokens=False)
        assert dec == text, (dec, text)
        toks.append({"text": text, "ids": ids})
    return {
        "chat_template": CHAT_TEMPLATE,
        "chat": chats,
        "tokenize": toks,
        "note": "ids are tokenizer(text, add_special_tokens=False); special tokens in text are matched as added tokens; decode(ids) == text for every case",
    }


# ----------------------------------------------------------------------------- model
def make_config(arch: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        initializer_range=INIT_RANGE,
        hidden_act="silu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
    )
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=False, use_sliding_window=False, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(tie_word_embeddings=True, use_sliding_window=False, **common)
    raise ValueError(arch)


def make_model(arch: str, vocab: int, seed: int):
    config = make_config(arch, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Overwrite every parameter with our own seeded values (independent of transformers' init).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:  # all RMSNorm weights, incl. qwen3 q_norm/k_norm: random around 1
                p.copy_(1.0 + 0.15 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):  # qwen2 q/k/v biases
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:  # wide logits: no near-ties
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(INIT_RANGE * torch.randn(p.shape, generator=g))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model.eval()
    return model


def save_model(arch: str, model, out: str) -> None:
    if arch == "llama":
        model.to(torch.float16).save_pretrained(out)
    elif arch == "qwen2":
        total = sum(p.numel() * 4 for p in model.state_dict().values())
        model.save_pretrained(out, max_shard_size=int(total * 0.6))
    elif arch == "qwen3":
        model.to(torch.bfloat16).save_pretrained(out)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    if arch == "qwen2":
        assert len(files) == 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), files
    else:
        assert files == ["model.safetensors"], files


def load_base(out: str):
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    m.eval()
    return m


# ----------------------------------------------------------------------------- adapters
LAYER_RE = r".*\.layers\.(0|2)\.(self_attn\.(k_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    # A regex string for target_modules: peft forbids layers_to_transform with a string, so the
    # layer restriction (layers 0 and 2) is part of the regex here; adapter d covers
    # layers_to_transform + layers_pattern with a list of modules.
    "c": dict(
        r=16,
        lora_alpha=32,
        target_modules=LAYER_RE,
        rank_pattern={"o_proj": 6},
        alpha_pattern={"down_proj": 8},
    ),
    "d": dict(
        r=4,
        lora_alpha=4,
        target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        rank_pattern={"up_proj": 2},
        alpha_pattern={"k_proj": 12},
    ),
}
# Stored dtype of each adapter file (exercises the loader; reference uses the stored values).
ADAPTER_DTYPES = {"a": torch.float32, "b": torch.float16, "c": torch.bfloat16, "d": torch.float32}
DELTA_STD = 0.12  # target std of an entry of scaling * B @ A


def make_adapter(base_dir: str, name: str, seed: int, out: str) -> None:
    model = load_base(base_dir)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **ADAPTERS[name])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for mname, mod in sorted(pm.named_modules(), key=lambda kv: kv[0]):
            if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                continue
            A = mod.lora_A["default"].weight
            B = mod.lora_B["default"].weight
            r = A.shape[0]
            scaling = mod.scaling["default"]
            a_std = 1.0 / (A.shape[1] ** 0.5)
            # an entry of scaling * B @ A has std scaling * sqrt(r) * a_std * b_std
            b_std = DELTA_STD / (scaling * (r ** 0.5) * a_std)
            A.copy_(a_std * torch.randn(A.shape, generator=g))
            B.copy_(b_std * torch.randn(B.shape, generator=g))
            n += 1
    assert n > 0
    pm.save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    tensors = load_file(path)
    dt = ADAPTER_DTYPES[name]
    save_file({k: v.to(dt).contiguous() for k, v in sorted(tensors.items())}, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    cpath = os.path.join(out, "adapter_config.json")
    with open(cpath) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "loramux-tiny-" + os.path.basename(os.path.dirname(os.path.dirname(out)))
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cpath, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


# ----------------------------------------------------------------------------- reference runs
def margin_of(logits_row: torch.Tensor) -> float:
    top = torch.topk(logits_row, 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def manual_greedy(model, ids: list, n: int, adapter_names=None):
    """Greedy by full forward passes (no cache): argmax of raw logits. Returns (tokens, margins)."""
    x = torch.tensor([ids])
    toks, margins = [], []
    for _ in range(n):
        kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
        logits = model(input_ids=x, **kw).logits[0, -1]
        t = int(torch.argmax(logits))
        toks.append(t)
        margins.append(margin_of(logits))
        x = torch.cat([x, torch.tensor([[t]])], dim=1)
    return toks, margins


@torch.no_grad()
def generate(model, batch: list, adapter_names=None):
    x = torch.tensor(batch)
    kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=0,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        num_beams=1,
    )
    # No eos stopping: generate() fills an unset eos_token_id from the model's generation_config,
    # so clear it there for this call.
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = inner.generation_config.eos_token_id
    inner.generation_config.eos_token_id = None
    try:
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            generation_config=gc,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )
    finally:
        inner.generation_config.eos_token_id = saved
    seqs = out.sequences[:, x.shape[1]:].tolist()
    assert all(len(s) == MAX_NEW_TOKENS for s in seqs), seqs
    margins = [margin_of(l[b]) for l in out.logits for b in range(x.shape[0])]
    return seqs, margins


@torch.no_grad()
def run_case(model, prompts, name, logits_out, margins):
    greedy = []
    for i, p in enumerate(prompts):
        logits = model(input_ids=torch.tensor([p])).logits[0].float()
        logits_out[f"{name}.{i}"] = logits.contiguous()
        toks, m1 = manual_greedy(model, p, MAX_NEW_TOKENS)
        gen, m2 = generate(model, [p])
        assert gen[0] == toks, (name, i, gen[0], toks)
        margins.extend(m1 + m2)
        greedy.append(toks)
    return greedy


def build_arch(arch: str, out: str, tok: Tokenizer, seed: int):
    """Build everything for one seed in `out`; return (expected, tensors, min_margin)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    write_tokenizer(tok, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = len(tokenizer)
    assert vocab == VOCAB_SIZE

    model = make_model(arch, vocab, seed)
    save_model(arch, model, out)
    del model

    prompts = []
    for text, n in zip(PROMPT_TEXTS, PROMPT_LENGTHS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= n, (text, len(ids))
        assert all(t >= len(SPECIALS) for t in ids[:n])  # no special tokens in prompts
        prompts.append(ids[:n])
    mixed_prompts = []
    for text in MIXED_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= MIXED_LENGTH
        assert all(t >= len(SPECIALS) for t in ids[:MIXED_LENGTH])
        mixed_prompts.append(ids[:MIXED_LENGTH])

    for k, name in enumerate(ADAPTERS):
        make_adapter(out, name, seed * 100 + k + 1, os.path.join(out, "adapters", name))

    logits, margins, cases = {}, [], []
    base = load_base(out)
    base_greedy = run_case(base, prompts, "base", logits, margins)
    cases.append({"name": "base", "adapter": None, "merged": False, "greedy": base_greedy})
    del base

    for name in ADAPTERS:
        adir = os.path.join(out, "adapters", name)
        pm = PeftModel.from_pretrained(load_base(out), adir, adapter_name=name)
        pm.eval()
        g_un = run_case(pm, prompts, f"{name}_unmerged", logits, margins)
        merged = PeftModel.from_pretrained(load_base(out), adir, adapter_name=name).merge_and_unload()
        merged.eval()
        g_m = run_case(merged, prompts, f"{name}_merged", logits, margins)
        assert g_un == g_m, (name, g_un, g_m)
        for i in range(len(prompts)):
            d = (logits[f"{name}_unmerged.{i}"] - logits[f"{name}_merged.{i}"]).abs().max().item()
            assert d < 1e-3, (name, i, d)
        changed = sum(a != b for a, b in zip(g_un, base_greedy))
        ldiff = max((logits[f"{name}_unmerged.{i}"] - logits[f"base.{i}"]).abs().max().item() for i in range(3))
        print(f"  [{arch} seed {seed}] adapter {name}: greedy differs from base on {changed}/3 prompts, max |dlogit| {ldiff:.3f}")
        assert changed >= 2, f"adapter {name} barely changes greedy output"
        cases.append({"name": f"{name}_unmerged", "adapter": name, "merged": False, "greedy": g_un})
        cases.append({"name": f"{name}_merged", "adapter": name, "merged": True, "greedy": g_m})

    # Mixed batch: one batch, one adapter per row, peft's adapter_names.
    pm = PeftModel.from_pretrained(load_base(out), os.path.join(out, "adapters", "a"), adapter_name="a")
    for name in ADAPTERS:
        if name != "a":
            pm.load_adapter(os.path.join(out, "adapters", name), adapter_name=name)
    pm.eval()
    names = [a if a is not None else "__base__" for a in MIXED_ADAPTERS]
    with torch.no_grad():
        ml = pm(input_ids=torch.tensor(mixed_prompts), adapter_names=names).logits.float()
    for i in range(len(mixed_prompts)):
        logits[f"mixed.{i}"] = ml[i].contiguous()
    mixed_greedy, m2 = generate(pm, mixed_prompts, adapter_names=names)
    margins.extend(m2)
    # Each row must equal its own batch-1 run with that adapter alone.
    for i, (p, a) in enumerate(zip(mixed_prompts, MIXED_ADAPTERS)):
        if a is None:
            solo = load_base(out)
        else:
            solo = PeftModel.from_pretrained(load_base(out), os.path.join(out, "adapters", a), adapter_name=a)
        solo.eval()
        with torch.no_grad():
            sl = solo(input_ids=torch.tensor([p])).logits[0].float()
        toks, m1 = manual_greedy(solo, p, MAX_NEW_TOKENS)
        margins.extend(m1)
        d = (sl - ml[i]).abs().max().item()
        assert d < 1e-4, ("mixed row", i, d)
        assert toks == mixed_greedy[i], ("mixed row", i, toks, mixed_greedy[i])
    assert mixed_greedy[0] != mixed_greedy[3], "same prompt with adapter a and base should differ"

    expected = {
        "arch": arch,
        "seed": seed,
        "prompts": prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_greedy_margin": min(margins),
        "cases": cases,
        "mixed": {"prompts": mixed_prompts, "adapters": MIXED_ADAPTERS, "greedy": mixed_greedy},
        "notes": [
            "greedy = argmax of raw logits, batch 1, no eos stopping, exactly max_new_tokens tokens",
            "logits in expected.safetensors: key '<case>.<i>' -> float32 [len(prompts[i]), vocab], full prompt forward; 'mixed.<i>' -> row i of the mixed batch",
            "all outputs computed from the model reloaded from disk in float32 and adapters reloaded from disk",
            "adapter c: target_modules is a regex string (peft re.fullmatch on module names like 'model.layers.0.self_attn.k_proj'); peft forbids layers_to_transform with a string target, so c restricts layers in the regex; d uses layers_to_transform + layers_pattern",
            "rank_pattern/alpha_pattern keys match module names by re.match('(.*\\\\.)?(KEY)$', name)",
            "adapter weight dtypes on disk: a float32, b float16, c bfloat16, d float32",
            "mixed rows 0 and 3 have the same prompt (adapter a vs base)",
        ],
        "versions": versions(),
    }
    return expected, logits, min(margins), tokenizer


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "tiny"))
    ap.add_argument("--arch", nargs="*", default=["llama", "qwen2", "qwen3"])
    ap.add_argument("--max-tries", type=int, default=200)
    args = ap.parse_args()
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)

    tok = train_tokenizer()
    for arch in args.arch:
        final = os.path.join(out_root, arch)
        with tempfile.TemporaryDirectory(prefix=f"loramux-tiny-{arch}-") as tmp:
            work = os.path.join(tmp, arch)
            for t in range(args.max_tries):
                seed = BASE_SEEDS[arch] + t
                try:
                    expected, logits, mm, tokenizer = build_arch(arch, work, tok, seed)
                except AssertionError as e:
                    print(f"  [{arch} seed {seed}] rejected: {e}")
                    continue
                print(f"  [{arch} seed {seed}] min greedy margin {mm:.4f}")
                if mm >= MIN_MARGIN:
                    break
            else:
                sys.exit(f"{arch}: no seed reached margin {MIN_MARGIN}")
            dump_json(expected, os.path.join(work, "expected.json"))
            save_file(dict(sorted(logits.items())), os.path.join(work, "expected.safetensors"), metadata={"format": "pt"})
            dump_json(chat_fixture(tokenizer), os.path.join(work, "chat.json"))
            for dirpath, _, files in os.walk(work):
                for fn in files:
                    os.chmod(os.path.join(dirpath, fn), 0o644)
            if os.path.exists(final):
                shutil.rmtree(final)
            shutil.copytree(work, final)
        print(f"{arch}: seed {expected['seed']}, min greedy margin {expected['min_greedy_margin']:.4f} -> {final}")


if __name__ == "__main__":
    main()
