"""Small helpers shared by the reference scripts."""
import json
import os
import re

_NUM_LIST = re.compile(r"\[\n\s*([-0-9.eE+, \n]+?)\n\s*\]")


def dump_json(obj, path: str) -> None:
    """json.dump with indent 1, but lists of numbers on one line (readable diffs, small files)."""
    s = json.dumps(obj, indent=1, ensure_ascii=False)
    s = _NUM_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", s)
    with open(path, "w", encoding="utf-8") as f:
        f.write(s + "\n")
    os.chmod(path, 0o644)
    assert json.load(open(path, encoding="utf-8")) == json.loads(json.dumps(obj))
