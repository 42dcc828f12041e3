"""Writes lm-eval-harness task YAMLs and their local data for the task adapters' held-out sets.

    make_tasks.py --url http://127.0.0.1:P --adapters DIR --limit N --out DIR

Three tasks, each over the first N items of DIR/<task>/heldout.jsonl ({"prompt", "answer"}):

- loramux_date_gen (generate_until): the date prompt as the user message, greedy, stopped at
  <|im_end|>, exact_match after trimming whitespace (what `bench quality` counts);
- loramux_date_ll (loglikelihood): the log-likelihood of the answer followed by <|im_end|>
  (the adapters were trained on that), and whether it is the greedy continuation;
- loramux_sentiment_mc (multiple_choice): "negative<|im_end|>" or "positive<|im_end|>".

The data is Parquet with a string schema: the `json` loader of `datasets` would read the date
answers ("1966-05-11") as timestamps and hand lm-eval "1966-05-11 00:00:00".

The generation budget is `bench quality`'s: the longest answer in tokens (with the end of
turn, tokenized in its chat context by the server) plus 3. It is written to manifest.json
with the items, for check.py.
"""

import argparse
import json
import os
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

CHOICES = ["negative", "positive"]
EOT = "<|im_end|>"
SPARE_TOKENS = 3


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def answer_tokens(url, prompt, answer, eot_id):
    """Tokens of the answer and its end of turn, as the chat template renders the answer turn."""
    user = [{"role": "user", "content": prompt}]
    head = post(f"{url}/tokenize", {"messages": user})["tokens"]
    full = post(f"{url}/tokenize", {"messages": user + [{"role": "assistant", "content": answer}], "add_generation_prompt": False})["tokens"]
    assert full[: len(head)] == head, f"the answer turn does not extend the prompt: {prompt!r}"
    return full[len(head) : full.index(eot_id, len(head)) + 1]


def read_items(adapters, task, limit):
    with open(os.path.join(adapters, task, "heldout.jsonl")) as f:
        items = [json.loads(line) for line in f if line.strip()]
    return items[:limit]


def write_data(path, items, labels):
    table = pa.table(
        {
            "prompt": pa.array([i["prompt"] for i in items], pa.string()),
            "answer": pa.array([i["answer"] for i in items], pa.string()),
            "target": pa.array([i["answer"] + EOT for i in items], pa.string()),
            "label": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, path)


def yaml_str(s):
    return json.dumps(s)  # a JSON string is a YAML string


def header(task, data):
    return "\n".join(
        [
            f"task: {task}",
            "dataset_path: parquet",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {yaml_str(data)}",
            "test_split: test",
            'doc_to_text: "{{prompt}}"',
        ]
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    eot_id = post(f"{a.url}/tokenize", {"prompt": EOT, "add_special_tokens": False})["tokens"]
    assert len(eot_id) == 1, f"{EOT} is not one token: {eot_id}"
    eot_id = eot_id[0]

    date = read_items(a.adapters, "date", a.limit)
    sentiment = read_items(a.adapters, "sentiment", a.limit)
    bad = [i["answer"] for i in sentiment if i["answer"] not in CHOICES]
    assert not bad, f"sentiment answers outside {CHOICES}: {bad}"
    budget = max(len(answer_tokens(a.url, i["prompt"], i["answer"], eot_id)) for i in date) + SPARE_TOKENS

    date_data = os.path.join(a.out, "date.parquet")
    sentiment_data = os.path.join(a.out, "sentiment.parquet")
    write_data(date_data, date, [0] * len(date))
    write_data(sentiment_data, sentiment, [CHOICES.index(i["answer"]) for i in sentiment])

    tasks = {
        "loramux_date_gen": header("loramux_date_gen", date_data)
        + f"""
output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{yaml_str(EOT)}]
  max_gen_toks: {budget}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
""",
        "loramux_date_ll": header("loramux_date_ll", date_data)
        + """
output_type: loglikelihood
doc_to_target: "{{target}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
""",
        "loramux_sentiment_mc": header("loramux_sentiment_mc", sentiment_data)
        + f"""
output_type: multiple_choice
doc_to_choice: [{", ".join(yaml_str(c + EOT) for c in CHOICES)}]
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""",
    }
    for name, text in tasks.items():
        with open(os.path.join(a.out, f"{name}.yaml"), "w") as f:
            f.write(text)
    manifest = {"limit": a.limit, "max_gen_toks": budget, "choices": CHOICES, "eot": EOT, "date": date, "sentiment": sentiment}
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"lm-eval tasks: {', '.join(tasks)} ({len(date)} date, {len(sentiment)} sentiment items, max_gen_toks {budget}) in {a.out}")


if __name__ == "__main__":
    main()
