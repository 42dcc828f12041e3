"""Small helpers shared by the reference scripts."""
import json
import os
import re

# Plain English text the tiny tokenizers are trained on (shared by the tiny-model and
# SentencePiece fixture scripts).
ENGLISH_CORPUS = """
The quick brown fox jumps over the lazy dog. The dog did not mind; it was a very lazy dog.
Once upon a time there was a small village by the sea. Every morning the fishermen went out
in their boats, and every evening they came back with nets full of fish. The children played
on the beach and the old people sat in the sun and told stories about the past.
A language model reads text one token at a time. It predicts the next token from the tokens it
has seen so far. Small models are fast, large models are smart, and adapters let one base model
learn many different styles without copying all of its weights.
How are you today? I am fine, thank you. What is the capital of France? The capital of France
is Paris. What is the capital of Italy? The capital of Italy is Rome. Water boils at 100 degrees
and freezes at 0 degrees. There are 7 days in a week, 12 months in a year and 365 days in a year.
The garden was full of flowers: red roses, yellow tulips, white lilies and blue violets.
She opened the window, looked at the rain, and decided to stay at home with a good book.
He wrote the code carefully, tested it twice, and then shipped it to the server on Friday.
If you want to learn something new, start small, practice every day, and be patient with yourself.
The river flows from the mountains to the sea, through forests, fields and old stone towns.
Please answer the question in one word. Thank you for your help, and have a nice day!
"""

_NUM_LIST = re.compile(r"\[\n\s*([-0-9.eE+, \n]+?)\n\s*\]")


def dump_json(obj, path: str) -> None:
    """json.dump with indent 1, but lists of numbers on one line (readable diffs, small files)."""
    s = json.dumps(obj, indent=1, ensure_ascii=False)
    s = _NUM_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", s)
    with open(path, "w", encoding="utf-8") as f:
        f.write(s + "\n")
    os.chmod(path, 0o644)
    assert json.load(open(path, encoding="utf-8")) == json.loads(json.dumps(obj))
