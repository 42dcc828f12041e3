#!/usr/bin/env python3
"""GGUF LoRA adapters written by llama.cpp's own convert_lora_to_gguf.py from PEFT adapters,
so the engine can be checked to give the PEFT original's outputs from the converted file.

Run inside the reference venv (scripts/reference/setup-venv.sh), after make_tiny_fixtures.py:
    python scripts/reference/make_gguf_lora_fixture.py [--tiny fixtures/tiny] [--adapters adapters]

llama.cpp's converter comes from the pinned llama-cpp-python sdist on PyPI (it vendors
llama.cpp: convert_lora_to_gguf.py, its conversion/ package and gguf-py), fetched with
`pip download` into the cache, sha256 checked, and run unmodified.

Writes (all small, committed):
    fixtures/tiny/llama/adapters_gguf/
        a.gguf          adapters/a converted with --outtype f32 (bit-exact)
        a-q8_0.gguf     adapters/a with --outtype q8_0 (lora_a Q8_0; lora_b has rows of r=4
                        values, which Q8_0's 32-value blocks do not divide: the converter falls
                        back to F16)
        e.gguf          peft/e with --outtype bf16 (bit-exact: e is stored bfloat16)
        peft/e/         a PEFT adapter made here: the 7 projections, layers 0 and 2,
                        rank_pattern {k_proj: 2, o_proj: 6} (covers q and k, whose lora_b rows
                        llama.cpp permutes for Llama)
        expected.json, expected.safetensors   transformers + peft outputs (same layout as the
                        tiny fixtures' expected files) for e, and for a-q8_0 as its values read
                        back by gguf-py (Q8_0 changes this tiny model's greedy tokens: the
                        reference for a lossy file is the adapter it holds); and what each
                        .gguf was made from
    fixtures/tiny/qwen2/adapters_gguf/a.gguf   adapters/a of qwen2, --outtype f32
and, when SmolLM2 is in the model cache, the real example adapter adapters/pirate converted
to ${LORAMUX_CACHE:-~/.cache/loramux}/adapters-gguf/pirate.gguf (1.8 MB: not committed).

Only adapters the GGUF format can express are converted: it keeps ONE alpha and scales every
projection by alpha over its own rank, so PEFT's use_rslora and alpha_pattern are dropped by
the converter (adapters b, c and d of the tiny fixtures would convert to different adapters).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_fixtures as tiny  # noqa: E402
from refutil import dump_json  # noqa: E402
from peft import PeftModel  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
CONVERTER_FILES = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# The adapter made here: every projection, two of three layers, two ranks overridden. No
# alpha_pattern and no rsLoRA, which the GGUF format cannot hold.
ADAPTER_E = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=[0, 2],
    layers_pattern="layers",
    rank_pattern={"k_proj": 2, "o_proj": 6},
)
E_SEED = 7000


def cache_dir() -> str:
    return os.environ.get("LORAMUX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loramux")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def converter() -> str:
    """Path of llama.cpp's convert_lora_to_gguf.py, unpacked from the pinned sdist."""
    root = os.path.join(cache_dir(), f"llama-cpp-python-{LLAMA_CPP_PYTHON}")
    script = os.path.join(root, VENDOR, "convert_lora_to_gguf.py")
    if os.path.exists(script):
        return script
    os.makedirs(root, exist_ok=True)
    sdist = os.path.join(root, SDIST)
    if not os.path.exists(sdist):
        # --no-binary for this package only: with ':all:' pip also builds the sdist's build
        # tools (cmake) from source just to read its metadata.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             "-d", root, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            check=True,
        )
    got = sha256(sdist)
    if got != SDIST_SHA256:
        os.remove(sdist)
        sys.exit(f"{SDIST}: sha256 {got}, expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(VENDOR + f for f in CONVERTER_FILES))]
        tar.extractall(root, members=members, filter="data")
    return script


def convert(script: str, base: str, adapter: str, outtype: str, out: str) -> None:
    """Runs llama.cpp's converter, unmodified, on a PEFT adapter directory."""
    run = subprocess.run(
        [sys.executable, script, "--base", base, "--outtype", outtype, "--outfile", out, adapter],
        cwd=os.path.dirname(script),
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        sys.exit(f"convert_lora_to_gguf.py failed on {adapter}:\n{run.stdout}{run.stderr}")
    os.chmod(out, 0o644)
    print(f"  {os.path.relpath(out)} <- {os.path.relpath(adapter)} (--outtype {outtype}, {os.path.getsize(out)} bytes)")


def check_expressible(adapter_dir: str) -> None:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert not cfg.get("use_rslora") and not cfg.get("alpha_pattern"), (
        f"{adapter_dir}: use_rslora/alpha_pattern cannot be expressed in a GGUF adapter (one alpha, scale alpha/r)"
    )


def make_adapter_e(base_dir: str, expected: dict, out_dir: str):
    """PEFT adapter e for the tiny Llama with its transformers + peft reference outputs; seeds
    are tried until greedy decoding never hinges on a near-tie and e changes most outputs."""
    tiny.ADAPTERS["e"] = ADAPTER_E
    tiny.ADAPTER_DTYPES["e"] = torch.bfloat16
    prompts = expected["prompts"]
    base_greedy = next(c["greedy"] for c in expected["cases"] if c["name"] == "base")
    for seed in range(E_SEED, E_SEED + 200):
        with tempfile.TemporaryDirectory(prefix="loramux-gguf-e-") as tmp:
            adir = os.path.join(tmp, "e")
            tiny.make_adapter(base_dir, "e", seed, adir)
            pm = PeftModel.from_pretrained(tiny.load_base(base_dir), adir, adapter_name="e")
            pm.eval()
            logits, margins = {}, []
            greedy = tiny.run_case(pm, prompts, "e_unmerged", logits, margins)
            changed = sum(a != b for a, b in zip(greedy, base_greedy))
            print(f"  [e seed {seed}] min greedy margin {min(margins):.4f}, differs from base on {changed}/3 prompts")
            if min(margins) < tiny.MIN_MARGIN or changed < 2:
                continue
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            shutil.copytree(adir, out_dir)
        with open(os.path.join(out_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = "loramux-tiny-llama"
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        return seed, greedy, logits, min(margins)
    sys.exit("adapter e: no seed reached the margin")


def gguf_as_peft(path: str, template_dir: str, n_head: int, n_kv_head: int, out_dir: str) -> None:
    """The adapter a GGUF file holds, written back as PEFT (config of `template_dir`): tensors
    dequantized by gguf-py, llama.cpp's q/k lora_b row permutation undone."""
    import gguf

    gguf_modules = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in gguf.GGUFReader(path).tensors:
        _, layer, module, _, half = t.name.split(".")
        shape = tuple(int(n) for n in reversed(t.shape))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        heads = {"attn_q": n_head, "attn_k": n_kv_head}.get(module)
        if half == "lora_b" and heads:
            # inverse of llama.cpp's reshape(heads, 2, hd/2, ...).swapaxes(1, 2)
            w = w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        key = f"base_model.model.model.layers.{layer}.{gguf_modules[module]}.lora_{'A' if half == 'lora_a' else 'B'}.weight"
        tensors[key] = torch.tensor(np.ascontiguousarray(w), dtype=torch.float32)
    os.makedirs(out_dir)
    shutil.copy(os.path.join(template_dir, "adapter_config.json"), out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def reference_of_gguf(path: str, base_dir: str, template_dir: str, prompts: list, case: str, logits: dict):
    """transformers + peft greedy tokens and logits of the adapter a GGUF file holds."""
    with open(os.path.join(base_dir, "config.json")) as f:
        cfg = json.load(f)
    with tempfile.TemporaryDirectory(prefix="loramux-gguf-peft-") as tmp:
        adir = os.path.join(tmp, "adapter")
        gguf_as_peft(path, template_dir, cfg["num_attention_heads"], cfg["num_key_value_heads"], adir)
        pm = PeftModel.from_pretrained(tiny.load_base(base_dir), adir)
        pm.eval()
        margins = []
        greedy = tiny.run_case(pm, prompts, case, logits, margins)
    # Not searched over seeds (the file is what the converter made of adapter a): half the
    # tiny fixtures' margin, still ~200x the engine's logit error (~2e-5).
    assert min(margins) >= tiny.MIN_MARGIN / 2, f"{path}: greedy margin {min(margins)}"
    return greedy, min(margins)


def pirate(script: str, adapters: str) -> None:
    """The real example adapter for SmolLM2, converted into the cache (too large to commit).
    The converter needs the base's config.json: transformers builds it from the GGUF."""
    gguf = os.path.join(cache_dir(), "models", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(gguf):
        print(f"  skipped pirate.gguf: {gguf} is not cached (loramux models pull smollm2-135m)")
        return
    from transformers import AutoConfig

    check_expressible(os.path.join(adapters, "pirate"))
    out = os.path.join(cache_dir(), "adapters-gguf", "pirate.gguf")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loramux-smollm2-config-") as base:
        config = AutoConfig.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(base)
        convert(script, base, os.path.join(adapters, "pirate"), "f16", out)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", default=os.path.join(here, "..", "..", "fixtures", "tiny"))
    ap.add_argument("--adapters", default=os.path.join(here, "..", "..", "adapters"))
    args = ap.parse_args()
    script = converter()

    llama = os.path.abspath(os.path.join(args.tiny, "llama"))
    out = os.path.join(llama, "adapters_gguf")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(llama, "expected.json")) as f:
        expected = json.load(f)
    seed, greedy, logits, margin = make_adapter_e(llama, expected, os.path.join(out, "peft", "e"))

    made = {}
    for name, src, outtype in [("a", "adapters/a", "f32"), ("a-q8_0", "adapters/a", "q8_0"), ("e", "adapters_gguf/peft/e", "bf16")]:
        check_expressible(os.path.join(llama, src))
        convert(script, llama, os.path.join(llama, src), outtype, os.path.join(out, f"{name}.gguf"))
        made[f"{name}.gguf"] = {"from": src, "outtype": outtype}
    q8_greedy, q8_margin = reference_of_gguf(
        os.path.join(out, "a-q8_0.gguf"), llama, os.path.join(llama, "adapters", "a"), expected["prompts"], "a-q8_0_unmerged", logits
    )

    qwen2 = os.path.abspath(os.path.join(args.tiny, "qwen2"))
    os.makedirs(os.path.join(qwen2, "adapters_gguf"), exist_ok=True)
    check_expressible(os.path.join(qwen2, "adapters", "a"))
    convert(script, qwen2, os.path.join(qwen2, "adapters", "a"), "f32", os.path.join(qwen2, "adapters_gguf", "a.gguf"))

    for d in (out, os.path.join(qwen2, "adapters_gguf")):
        with open(os.path.join(d, ".gitignore"), "w") as f:
            f.write("# The repo ignores *.gguf; these small adapters are committed fixtures (make_gguf_lora_fixture.py).\n!*.gguf\n")

    dump_json(
        {
            "seed": seed,
            "prompts": expected["prompts"],
            "max_new_tokens": expected["max_new_tokens"],
            "min_greedy_margin": min(margin, q8_margin),
            "cases": [
                {"name": "e_unmerged", "adapter": "e", "merged": False, "greedy": greedy},
                {"name": "a-q8_0_unmerged", "adapter": "a-q8_0", "merged": False, "greedy": q8_greedy},
            ],
            "gguf": made,
            "notes": [
                "e = peft/e (PEFT, bfloat16 weights) applied unmerged by peft on the float32 tiny llama; greedy and logits as in ../expected.json",
                "a-q8_0 = the values a-q8_0.gguf holds (read and dequantized by gguf-py, q/k lora_b rows un-permuted), written back as PEFT with adapters/a's config and applied by peft; Q8_0 moves this tiny model's outputs off adapter a's",
                "logits in expected.safetensors: '<case>.<i>' -> float32 [len(prompts[i]), vocab]",
                "gguf: each .gguf here was written by llama.cpp's convert_lora_to_gguf.py (llama-cpp-python "
                + LLAMA_CPP_PYTHON + " sdist) with --base fixtures/tiny/llama from the PEFT adapter 'from' (relative to fixtures/tiny/llama)",
            ],
            "versions": {**tiny.versions(), "llama-cpp-python": LLAMA_CPP_PYTHON},
        },
        os.path.join(out, "expected.json"),
    )
    path = os.path.join(out, "expected.safetensors")
    save_file(dict(sorted(logits.items())), path, metadata={"format": "pt"})
    os.chmod(path, 0o644)

    pirate(script, os.path.abspath(args.adapters))


if __name__ == "__main__":
    main()
