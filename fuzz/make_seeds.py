#!/usr/bin/env python3
"""Writes the committed seed corpora fuzz/corpus/<target>/ from the repository's fixtures
(and, when cached, the chat templates of the two real models). Stdlib only; idempotent.

    python3 fuzz/make_seeds.py        # from the repository root
"""
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def gguf_strings(path, wanted):
    """The string metadata values named in `wanted` of a GGUF v2/v3 file (header only)."""
    out = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return out
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            return out
        _tensors, kvs = struct.unpack("<QQ", f.read(16))
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)

        def skip(t):
            if t == 8:
                string()
            elif t == 9:
                (et,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                if et in sizes:
                    f.seek(n * sizes[et], 1)
                else:
                    for _ in range(n):
                        skip(et)
            else:
                f.seek(sizes[t], 1)

        for _ in range(kvs):
            key = string().decode("utf-8", "replace")
            (t,) = struct.unpack("<I", f.read(4))
            if t == 8 and key in wanted:
                out[key] = string().decode("utf-8", "replace")
            else:
                skip(t)
    return out


class Gguf:
    """A GGUF v3 file taken apart into raw metadata entries and tensors, and written back."""

    SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def __init__(self, data):
        self.pos = 8
        self.data = data
        nt, nk = struct.unpack_from("<QQ", data, self.pos)
        self.pos += 16
        self.kvs = []  # raw bytes of each entry
        for _ in range(nk):
            start = self.pos
            self.string()
            (t,) = self.unpack("<I")
            self.skip(t)
            self.kvs.append(data[start:self.pos])
        infos = []
        for _ in range(nt):
            name = self.string()
            (nd,) = self.unpack("<I")
            dims = self.unpack(f"<{nd}Q")
            dtype, off = self.unpack("<IQ")
            infos.append((name, dims, dtype, off))
        base = (self.pos + 31) // 32 * 32
        self.tensors = []  # (name, dims, ggml dtype, bytes)
        for name, dims, dtype, off in infos:
            n = 1
            for d in dims:
                n *= d
            assert dtype == 0, "the fixture is float32"
            self.tensors.append([name, dims, dtype, data[base + off: base + off + 4 * n]])

    def unpack(self, fmt):
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        (n,) = self.unpack("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def skip(self, t):
        if t == 8:
            self.string()
        elif t == 9:
            et, n = self.unpack("<IQ")
            if et in self.SIZES:
                self.pos += n * self.SIZES[et]
            else:
                for _ in range(n):
                    self.skip(et)
        else:
            self.pos += self.SIZES[t]

    def write(self, extra_kvs=b"", alignment=32):
        out = [b"GGUF", struct.pack("<IQQ", 3, len(self.tensors), len(self.kvs) + (1 if extra_kvs else 0))]
        out += self.kvs
        if extra_kvs:
            out.append(extra_kvs)
        off, blobs = 0, []
        for name, dims, dtype, data in self.tensors:
            pad = (-off) % alignment
            blobs.append(b"\0" * pad + data)
            off += pad
            out.append(struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, dtype, off))
            off += len(data)
        head = b"".join(out)
        head += b"\0" * ((-len(head)) % alignment)
        return head + b"".join(blobs)


def floats(data):
    return struct.unpack(f"<{len(data) // 4}f", data)


def q8_0(xs):
    out = b""
    for i in range(0, len(xs), 32):
        b = xs[i:i + 32]
        d = max(abs(x) for x in b) / 127 or 1.0
        out += struct.pack("<e", d) + struct.pack("<32b", *[max(-127, min(127, round(x / d))) for x in b])
    return out


def q4_0(xs):
    out = b""
    for i in range(0, len(xs), 32):
        b = xs[i:i + 32]
        m = max(b, key=abs)
        d = m / -8 or 1.0
        q = [max(0, min(15, int(x / d + 8.5))) for x in b]
        out += struct.pack("<e", d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


def f16(xs):
    return struct.pack(f"<{len(xs)}e", *xs)


def gguf_seeds():
    spm = open(os.path.join(ROOT, "fixtures/tiny/spm/tiny-spm.gguf"), "rb").read()
    put("gguf", "tiny-spm", spm)  # a whole small SentencePiece Llama, loads end to end
    put("gguf", "tiny-spm-header-only", spm[:4096])
    put("gguf", "tiny-spm-truncated-tensors", spm[: len(spm) * 3 // 4])
    # Version 2 header (same layout, 64-bit lengths) and a zero-tensor, zero-kv file.
    put("gguf", "tiny-spm-v2", spm[:4] + struct.pack("<I", 2) + spm[8:])
    put("gguf", "empty-v3", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    # The quantized and half-precision repacking paths: ffn_down (rows of 32) in Q8_0 / Q4_0,
    # attention projections in F16; and an explicit general.alignment the fuzzer can mutate.
    for name, quant, qtype in [("tiny-spm-q8_0", q8_0, 8), ("tiny-spm-q4_0", q4_0, 2)]:
        g = Gguf(spm)
        for t in g.tensors:
            if t[0].endswith(b"ffn_down.weight"):
                t[2], t[3] = qtype, quant(floats(t[3]))
            elif t[0].endswith((b"attn_q.weight", b"attn_k.weight")):
                t[2], t[3] = 1, f16(floats(t[3]))
        put("gguf", name, g.write())
    key = b"general.alignment"
    put("gguf", "tiny-spm-aligned-64",
        Gguf(spm).write(struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 64), alignment=64))


def adapter_seeds():
    base = os.path.join(ROOT, "fixtures/tiny/llama/adapters")
    for name in sorted(os.listdir(base)):
        d = os.path.join(base, name)
        cfg = open(os.path.join(d, "adapter_config.json"), "rb").read()
        st = open(os.path.join(d, "adapter_model.safetensors"), "rb").read()
        assert len(cfg) < 65536
        put("adapter", f"tiny-llama-{name}", struct.pack("<H", len(cfg)) + cfg + st)
    # A minimal config with a safetensors header only (no tensors).
    cfg = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}).encode()
    hdr = b'{"__metadata__":{"format":"pt"}}'
    st = struct.pack("<Q", len(hdr)) + hdr
    put("adapter", "minimal-empty", struct.pack("<H", len(cfg)) + cfg + st)


def chat_seeds():
    templates = {}
    for m in ["llama", "qwen2", "qwen3"]:
        t = json.load(open(os.path.join(ROOT, f"fixtures/tiny/{m}/tokenizer_config.json"))).get("chat_template")
        if isinstance(t, str):
            templates.setdefault(t, f"tiny-{m}")
    cache = os.environ.get("LORAMUX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loramux")
    for name, file in [("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                       ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct.gguf")]:
        p = os.path.join(cache, "models", name, file)
        if os.path.exists(p):
            t = gguf_strings(p, {"tokenizer.chat_template"}).get("tokenizer.chat_template")
            if t:
                templates.setdefault(t, name)
    msgs = ["system", "You are terse.", "user", "What is 2+2?", "assistant", "4", "user", "And {{ 3*3 }}?"]
    for t, name in templates.items():
        put("chat_template", name, "\0".join([t, "<s>", "</s>"] + msgs))
    # Hostile shapes: Python string methods, raise_exception, loops, macros, strftime_now.
    put("chat_template", "pycompat",
        "{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip().split(' ')|join(',') }}"
        "{% if m.content.startswith('x') %}{{ raise_exception('no x') }}{% endif %}{% endfor %}"
        "{{ strftime_now('%Y') }}{% if add_generation_prompt %}{{ bos_token ~ eos_token }}{% endif %}"
        "\0B\0E\0user\0xhello\0assistant\0ok")
    put("chat_template", "macro-recursion",
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{{ n }}{% endmacro %}{{ f(messages|length * 10) }}"
        "\0\0\0user\0a\0user\0b")


def openai_seeds():
    msg = [{"role": "user", "content": "Hi"}]
    chats = {
        "chat-basic": {"model": "pirate", "messages": msg, "max_tokens": 16},
        "chat-stream-usage": {"model": "base", "messages": [{"role": "system", "content": "Be brief."}] + msg,
                              "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "chat-stop-seed": {"messages": msg, "stop": ["\n", "END"], "seed": 7, "temperature": 0.7, "top_p": 0.9,
                           "top_k": 40, "n": 2, "max_completion_tokens": 8},
        "chat-logprobs": {"messages": msg, "logprobs": True, "top_logprobs": 5, "stop_token_ids": [2, 3]},
        "chat-logit-bias": {"messages": msg, "logit_bias": {"50256": -100}},
        "chat-tools": {"messages": msg, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                       "tool_choice": "auto", "parallel_tool_calls": False},
        "chat-parts": {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                    {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "image_url"}]}]},
        "chat-response-format": {"messages": msg, "response_format": {"type": "json_object"}, "ignore_eos": True},
    }
    comps = {
        "completion-basic": {"model": "cowboy", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        "completion-tokens": {"prompt": [[1, 2, 3], "text"], "n": 3, "logprobs": 2, "echo": False, "suffix": ""},
        "completion-stream": {"prompt": [1, 2, 3, 4294967295], "stream": True, "stream_options": {"include_usage": True},
                              "stop": "x", "max_tokens": 4096},
    }
    for name, body in {**chats, **comps}.items():
        put("openai_request", name, json.dumps(body))


def tenants_seeds():
    digest = "sha256:" + "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    put("tenants_file", "full", f"""[[tenants]]
name = "acme"
api_keys = ["{digest}", "plain-key"]
adapters = ["sql", "acme/*", "?ql"]
default_adapter = "sql"
weight = 1.5
max_concurrency = 4
requests_per_minute = 60
tokens_per_minute = 20000
max_uploads = 10
max_upload_rank = 64

[[tenants]]
name = "b.team_2"
api_keys = []
adapters = ["*"]
""")
    put("tenants_file", "refused", """[[tenants]]
name = "x"
api_keys = ["k", "k"]
adapters = ["a"]
default_adapter = "b"
weight = -1.0
""")
    put("tenants_file", "empty", "")


def upload_seeds():
    def part(name, data, filename=None):
        fname = f'; filename="{filename}"' if filename else ""
        return f'--XyZ\r\nContent-Disposition: form-data; name="{name}"{fname}\r\n\r\n'.encode() + data + b"\r\n"
    config = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode()
    put("upload_multipart", "peft", part("adapter_config.json", config) + part("adapter_model.safetensors", b"\x08\0\0\0\0\0\0\0{}      ")
        + part("name", b"sql") + part("overwrite", b"true") + part("routing.json", b'{"examples": ["a"]}') + b"--XyZ--\r\n")
    put("upload_multipart", "gguf", b"multipart/form-data; boundary=q\n--q\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.gguf\"\r\n\r\nGGUF\r\n--q--\r\n")
    put("upload_multipart", "path", part("lora_path", b"/etc") + b"--XyZ--\r\n")


def uri_seeds():
    """Adapter URIs (issue #23): each form, a pin, a local path."""
    for name, uri in [
        ("s3_folder", "s3://bucket/adapters/pirate"),
        ("s3_pinned_gguf", "s3://my-bucket/a.gguf#sha256=" + "0123456789abcdef" * 4),
        ("hub_revision", "hf://org/repo/sub@v1"),
        ("hub", "hf://org/repo"),
        ("https_tar", "https://example.com/x/a.tar.gz"),
        ("http_zip", "http://127.0.0.1:9000/a.zip"),
        ("path", "adapters/pirate"),
    ]:
        put("adapter_uri", name, uri.encode())


def main():
    gguf_seeds()
    adapter_seeds()
    chat_seeds()
    openai_seeds()
    tenants_seeds()
    upload_seeds()
    uri_seeds()
    total = 0
    for dirpath, _, files in os.walk(CORPUS):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    print(f"seed corpora: {total} bytes under {os.path.relpath(CORPUS, ROOT)}/")
    if total >= 1 << 20:
        sys.exit("seed corpora must stay under 1 MiB")


if __name__ == "__main__":
    main()
