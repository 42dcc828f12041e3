#!/usr/bin/env python3
"""Task adapters with exact answers (issue #19): data generator, one LoRA per task, rank sweep.

Run inside the reference venv, after `fetch-model.sh smollm2-135m`:
    python scripts/reference/make_task_adapters.py [--out adapters/tasks] [--only sql] [--steps N]
                                                   [--sweep | --no-sweep] [--data-only]

Five tasks, each a user message -> one exact, single-line answer that a greedy decode should
output verbatim (templates and word lists are inline below; everything is seeded):
  sql        English question about employees(name, department, salary, city) -> canonical SQL
  json       sentence about a person -> {"name": ..., "age": ..., "city": ...}
  date       a date in varied English forms -> YYYY-MM-DD
  sentiment  short product/movie review -> positive | negative
  numbers    number words -> digits
About half the prompts carry a short instruction (varied wording), the other half are the bare
input. Per task: 600 training examples, 100 held-out and 8 routing examples; held-out and routing
examples are disjoint from training in their underlying values (the SQL query, the person, the
date, the number; for sentiment the reviewed item), not just in phrasing, and from each other.

Training follows train_example_adapters.py: base SmolLM2-135M-Instruct loaded by transformers from
the Q4_1 GGUF and dequantized to float32; prompts rendered with the model's own chat template
(default system prompt included); loss on the assistant tokens only (content + <|im_end|>);
AdamW lr 1e-3 with linear decay, 40 steps of batch 8, seed 0. LoRA r=8, alpha=16 on q_proj,v_proj
of all 30 layers, saved as bfloat16 (PEFT layout). Evaluation reloads the saved adapter from disk: greedy exact match
and teacher-forced answer log-likelihood on the held-out split, for the base and the adapter.

Rank sweep (task `sql`): ranks 1..64 with alpha = 2r (scale 2), same data, steps, seed and targets;
written to ${LORAMUX_CACHE:-~/.cache/loramux}/adapters/rank-sweep/sql-r<R>/ (not committed), summary
in <out>/rank_sweep.json.
"""
import argparse
import calendar
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# torch's OpenMP threads otherwise spin at every barrier; on 2 cores shared with a cargo build that
# makes a training step ~3x slower. The wait policy does not change any result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CACHE = os.environ.get("LORAMUX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loramux")
MODEL_DIR = os.path.join(CACHE, "models", "smollm2-135m")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = 2

SEED = 0
RANK = 8
ALPHA = 16
TARGETS = ["q_proj", "v_proj"]
STEPS = 40
BATCH = 8
LR = 1e-3
N_TRAIN = 600
N_HELDOUT = 100
N_ROUTING = 8
EVAL_FRACTION = 0.25          # share of each task's value space reserved for held-out/routing
SWEEP_TASK = "sql"
SWEEP_RANKS = [1, 2, 4, 8, 16, 32, 64]
TASKS = ["sql", "json", "date", "sentiment", "numbers"]

# ---------------------------------------------------------------------------------------------
# Data generation (pure Python)
# ---------------------------------------------------------------------------------------------


def in_eval_part(task, key):
    """Deterministic split of a task's value space: True for the held-out/routing part."""
    h = hashlib.sha256(f"{task}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "big") < EVAL_FRACTION * 2 ** 32


def with_instruction(rng, wrappers, bare):
    """About half the prompts get an instruction (one of several wordings), half are bare."""
    if rng.random() < 0.5:
        return rng.choice(wrappers).format(x=bare)
    return bare


# --- sql ----------------------------------------------------------------------------------------
SQL_SCHEMA = "employees(name, department, salary, city)"
SQL_DEPTS = ["Sales", "Marketing", "Engineering", "Finance", "HR", "Legal", "Support", "Research",
             "Operations", "Design"]
SQL_CITIES = ["Berlin", "Paris", "London", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo",
              "Lisbon", "Warsaw", "Zurich", "Boston", "Chicago", "Denver", "Austin", "Seattle",
              "Toronto", "Sydney", "Tokyo"]
SQL_PEOPLE = ["Alice", "Bob", "Carlos", "Diana", "Ethan", "Fatima", "George", "Hannah", "Ivan",
              "Julia", "Kenji", "Laura", "Mohamed", "Nina", "Oscar", "Priya", "Quentin", "Rosa",
              "Samuel", "Tara", "Umar", "Vera", "William", "Xenia", "Yusuf", "Zoe", "Anna", "Ben",
              "Chloe", "David"]
SQL_SALARIES = list(range(30000, 150001, 5000))
SQL_TEMPLATES = [
    # (parameters, question phrasings, canonical SQL)
    ("d", ["List the names of employees in the {d} department.", "Who works in {d}?",
           "Show the names of everyone in the {d} department."],
     "SELECT name FROM employees WHERE department = '{d}';"),
    ("c", ["How many employees work in {c}?", "Count the employees based in {c}.",
           "What is the number of employees in {c}?"],
     "SELECT COUNT(*) FROM employees WHERE city = '{c}';"),
    ("n", ["Which employees earn more than {ns}?", "List employees with a salary above {ns}.",
           "Who makes over {ns}?"],
     "SELECT name FROM employees WHERE salary > {n};"),
    ("n", ["Which employees earn less than {ns}?", "List employees with a salary below {ns}.",
           "Who makes under {ns}?"],
     "SELECT name FROM employees WHERE salary < {n};"),
    ("d", ["What is the average salary in the {d} department?", "Average salary of {d} employees?",
           "Compute the mean salary for {d}."],
     "SELECT AVG(salary) FROM employees WHERE department = '{d}';"),
    ("c", ["What is the highest salary in {c}?", "Find the maximum salary among employees in {c}.",
           "Top salary in {c}?"],
     "SELECT MAX(salary) FROM employees WHERE city = '{c}';"),
    ("d", ["What is the lowest salary in the {d} department?", "Minimum salary in {d}?",
           "Find the smallest salary paid in {d}."],
     "SELECT MIN(salary) FROM employees WHERE department = '{d}';"),
    ("dc", ["List the {d} employees who work in {c}.", "Who in {d} is based in {c}?",
            "Show the names of {d} staff located in {c}."],
     "SELECT name FROM employees WHERE department = '{d}' AND city = '{c}';"),
    ("dn", ["How many {d} employees earn more than {ns}?",
            "Count the people in {d} with a salary above {ns}."],
     "SELECT COUNT(*) FROM employees WHERE department = '{d}' AND salary > {n};"),
    ("dc", ["How many {d} employees are there in {c}?", "Count the {d} staff in {c}."],
     "SELECT COUNT(*) FROM employees WHERE department = '{d}' AND city = '{c}';"),
    ("cn", ["Who in {c} earns more than {ns}?", "List employees in {c} with a salary above {ns}."],
     "SELECT name FROM employees WHERE city = '{c}' AND salary > {n};"),
    ("c", ["Show all employees in {c} sorted by salary, highest first.",
           "List everyone in {c} from the highest to the lowest salary."],
     "SELECT * FROM employees WHERE city = '{c}' ORDER BY salary DESC;"),
    ("c", ["Show all employees in {c} sorted by salary, lowest first.",
           "List everyone in {c} from the lowest to the highest salary."],
     "SELECT * FROM employees WHERE city = '{c}' ORDER BY salary ASC;"),
    ("k", ["Who are the {k} highest-paid employees?", "List the top {k} earners.",
           "Show the {k} best-paid employees."],
     "SELECT name FROM employees ORDER BY salary DESC LIMIT {k};"),
    ("c", ["How many employees does each department have in {c}?",
           "Count the employees per department in {c}."],
     "SELECT department, COUNT(*) FROM employees WHERE city = '{c}' GROUP BY department;"),
    ("p", ["Which city does {p} live in?", "Where is {p} based?", "In which city does {p} work?"],
     "SELECT city FROM employees WHERE name = '{p}';"),
    ("p", ["What is {p}'s salary?", "How much does {p} earn?", "Look up the salary of {p}."],
     "SELECT salary FROM employees WHERE name = '{p}';"),
    ("p", ["Which department is {p} in?", "What department does {p} work in?"],
     "SELECT department FROM employees WHERE name = '{p}';"),
]
SQL_WRAPPERS = [
    "Write a SQL query for the table " + SQL_SCHEMA + ": {x}",
    "Table: " + SQL_SCHEMA + ". Write SQL for: {x}",
    "Translate to SQL over " + SQL_SCHEMA + ". {x}",
    "SQL query please (table " + SQL_SCHEMA + "): {x}",
]


def gen_sql(rng):
    params, questions, sql = rng.choice(SQL_TEMPLATES)
    v = {"d": rng.choice(SQL_DEPTS), "c": rng.choice(SQL_CITIES), "p": rng.choice(SQL_PEOPLE),
         "n": rng.choice(SQL_SALARIES), "k": rng.randint(2, 20)}
    v["ns"] = f"{v['n']:,}" if rng.random() < 0.3 else str(v["n"])
    answer = sql.format(**v)
    prompt = with_instruction(rng, SQL_WRAPPERS, rng.choice(questions).format(**v))
    return answer, prompt, answer


# --- json ---------------------------------------------------------------------------------------
JSON_NAMES = ["Maria", "John", "Aisha", "Pedro", "Mei", "Lukas", "Sofia", "Omar", "Emma", "Raj",
              "Chen", "Olivia", "Mateo", "Yuki", "Amara", "Noah", "Ingrid", "Diego", "Leila", "Tomas",
              "Hana", "Samir", "Clara", "Kofi", "Elena", "Felix", "Nadia", "Hugo", "Zara", "Arjun",
              "Greta", "Malik", "Lucia", "Sven", "Ayumi", "Pablo", "Fiona", "Tariq", "Irene", "Jonas"]
JSON_CITIES = ["Lisbon", "Berlin", "Nairobi", "Lima", "Osaka", "Toronto", "Cairo", "Dublin",
               "Seoul", "Madrid", "Oslo", "Mumbai", "Chicago", "Vienna", "Accra", "Hanoi", "Quito",
               "Athens", "Denver", "Krakow", "Porto", "Manila", "Glasgow", "Santiago", "Helsinki",
               "Marseille", "Istanbul", "Melbourne", "Bogota", "Tunis"]
JSON_SENTENCES = [
    "{n} is {a} years old and lives in {c}.",
    "{n}, aged {a}, lives in {c}.",
    "{n} lives in {c} and is {a}.",
    "Meet {n}: {a} years old, living in {c}.",
    "At {a}, {n} calls {c} home.",
    "{n} ({a}) is from {c}.",
    "My neighbour {n} is {a} and lives in {c}.",
    "{n} moved to {c} and just turned {a}.",
]
JSON_WRAPPERS = [
    "Extract the person as JSON with keys name, age, city: {x}",
    "Convert to JSON (name, age, city): {x}",
    "Return a JSON object for this person: {x}",
    "Turn this sentence into JSON: {x}",
]


def gen_json(rng):
    n, a, c = rng.choice(JSON_NAMES), rng.randint(18, 89), rng.choice(JSON_CITIES)
    answer = json.dumps({"name": n, "age": a, "city": c})
    prompt = with_instruction(rng, JSON_WRAPPERS, rng.choice(JSON_SENTENCES).format(n=n, a=a, c=c))
    return f"{n}|{a}|{c}", prompt, answer


# --- date ---------------------------------------------------------------------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                 "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
                 "seventeenth", "eighteenth", "nineteenth", "twentieth", "twenty-first",
                 "twenty-second", "twenty-third", "twenty-fourth", "twenty-fifth", "twenty-sixth",
                 "twenty-seventh", "twenty-eighth", "twenty-ninth", "thirtieth", "thirty-first"]


def ordinal_suffix(d):
    if 10 <= d % 100 <= 20:
        return f"{d}th"
    return f"{d}" + {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


DATE_FORMS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal_suffix(d)}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{ordinal_suffix(d)} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"the {ORDINAL_WORDS[d - 1]} of {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} the {ORDINAL_WORDS[d - 1]}, {y}",
    lambda y, m, d: f"{MONTH_ABBR[m - 1]} {d}, {y}",
    lambda y, m, d: f"{m}/{d}/{y} (US)",
    lambda y, m, d: f"{d}/{m}/{y} (UK)",
]
DATE_WRAPPERS = [
    "Convert to ISO 8601: {x}",
    "What is this date in YYYY-MM-DD? {x}",
    "Write {x} in YYYY-MM-DD format.",
    "Normalize this date to ISO format: {x}",
]


def gen_date(rng):
    y, m = rng.randint(1950, 2049), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    answer = f"{y:04d}-{m:02d}-{d:02d}"
    text = rng.choice(DATE_FORMS)(y, m, d)
    if rng.random() < 0.5 and text[0].islower():
        text = text[0].upper() + text[1:]
    return answer, with_instruction(rng, DATE_WRAPPERS, text), answer


# --- sentiment ----------------------------------------------------------------------------------
# The reviewed item is the underlying value: held-out and routing reviews are about items that
# never occur in training (the phrase lists are shared).
SENT_ITEMS = {
    "product": ["this blender", "these headphones", "the new phone", "this vacuum cleaner",
                "this coffee maker", "the backpack", "these running shoes", "this desk lamp",
                "the keyboard", "this tent", "the air fryer", "this jacket", "the smartwatch",
                "this mattress", "the printer", "this water bottle", "the office chair",
                "this kettle", "the electric toothbrush", "this camera"],
    "movie": ["the movie", "this film", "the sequel", "this documentary", "the new series",
              "this thriller", "the comedy", "this animated film", "the remake", "this horror movie",
              "the musical", "this war drama"],
}
SENT_EVAL_ITEMS = {"product": ["these headphones", "the air fryer", "this mattress", "this camera",
                               "the office chair"],
                   "movie": ["this documentary", "the remake", "this war drama"]}
SENT_PHRASES = {
    ("product", "positive"): ["works perfectly", "is really well made", "exceeded my expectations",
                              "is worth every penny", "does exactly what it promises",
                              "feels sturdy and reliable", "is a joy to use", "is better than I hoped"],
    ("product", "negative"): ["stopped working after a week", "feels cheap and flimsy",
                              "is a complete waste of money", "broke the first time I used it",
                              "does not do what it promises", "is noisy and hard to clean",
                              "was a huge disappointment", "arrived damaged"],
    ("movie", "positive"): ["is a masterpiece", "kept me on the edge of my seat",
                            "has wonderful acting", "is funny and moving", "has a beautiful soundtrack",
                            "is the best thing I have seen this year", "made me smile all the way through",
                            "is beautifully shot"],
    ("movie", "negative"): ["is painfully boring", "has a predictable plot", "wastes a great cast",
                            "is far too long", "makes no sense at all", "was a chore to sit through",
                            "has terrible dialogue", "put me to sleep"],
}
SENT_MINOR = {
    ("product", "positive"): ["The box looks nice", "The price seemed fair", "Delivery was fast"],
    ("product", "negative"): ["The manual is confusing", "The packaging was a mess",
                              "It took a while to arrive"],
    ("movie", "positive"): ["The trailer looked promising", "The poster is great",
                            "The opening scene is lovely"],
    ("movie", "negative"): ["The first ten minutes drag", "The seats were uncomfortable",
                            "The opening is a bit slow"],
}
SENT_CLOSERS = {
    ("product", "positive"): ["Would buy again.", "Highly recommended.", "Five stars.", "I love it."],
    ("product", "negative"): ["Would not recommend.", "One star.", "Avoid it.", "I want my money back."],
    ("movie", "positive"): ["Go see it.", "Five stars.", "Loved every minute.", "Highly recommended."],
    ("movie", "negative"): ["Skip it.", "One star.", "What a waste of an evening.", "Not recommended."],
}
SENT_OPENERS = ["", "", "Honestly, ", "I have to say ", "Well, ", "In short, "]
SENT_WRAPPERS = [
    "Is this review positive or negative? {x}",
    "Sentiment (positive or negative): {x}",
    "Classify this review as positive or negative: {x}",
    "Review: {x} Positive or negative?",
]


def cap(s):
    return s[0].upper() + s[1:]


def gen_sentiment_in(rng, part):
    kind = rng.choice(["product", "movie"])
    items = [i for i in SENT_ITEMS[kind] if (i in SENT_EVAL_ITEMS[kind]) == (part == "eval")]
    item = rng.choice(items)
    label = rng.choice(["positive", "negative"])
    other = "negative" if label == "positive" else "positive"
    form = rng.randrange(3)
    if form == 0:
        p = rng.choice(SENT_PHRASES[kind, label])
        text = cap(f"{rng.choice(SENT_OPENERS)}{item} {p}. {rng.choice(SENT_CLOSERS[kind, label])}")
    elif form == 1:
        p1, p2 = rng.sample(SENT_PHRASES[kind, label], 2)
        text = cap(f"{rng.choice(SENT_OPENERS)}{item} {p1} and {p2}.")
    else:  # a minor point of the other polarity, then the verdict after "but"
        minor = rng.choice(SENT_MINOR[kind, other])
        text = f"{minor}, but {item} {rng.choice(SENT_PHRASES[kind, label])}."
    return f"{item}|{text}", with_instruction(rng, SENT_WRAPPERS, text), label


# --- numbers ------------------------------------------------------------------------------------
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n, use_and, hyphen):
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else ("-" if hyphen else " ") + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + (
            "" if rest == 0 else (" and " if use_and else " ") + number_words(rest, use_and, hyphen))
    rest = n % 1000
    head = number_words(n // 1000, use_and, hyphen) + " thousand"
    if rest == 0:
        return head
    sep = " and " if use_and and rest < 100 else " "
    return head + sep + number_words(rest, use_and, hyphen)


NUM_WRAPPERS = [
    "Write this number in digits: {x}",
    "{x} in digits?",
    "Convert to a number: {x}",
    "What number is \"{x}\"?",
]


def gen_numbers(rng):
    r = rng.random()
    n = rng.randint(1, 99) if r < 0.15 else rng.randint(100, 999) if r < 0.5 else rng.randint(1000, 999999)
    text = number_words(n, rng.random() < 0.5, rng.random() < 0.7)
    if rng.random() < 0.3:
        text = cap(text)
    return str(n), with_instruction(rng, NUM_WRAPPERS, text), str(n)


DESCRIPTIONS = {
    "sql": "Translates an English question about the table employees(name, department, salary, city) "
           "into one canonical SQL query.",
    "json": "Turns a sentence about a person into a compact JSON object with the keys name, age and city.",
    "date": "Converts a date written in English (words, ordinals, US or UK numeric) into ISO 8601 YYYY-MM-DD.",
    "sentiment": "Classifies a short product or movie review as positive or negative, answering with one word.",
    "numbers": "Converts a number written in English words into digits.",
}


def gen_in(task, rng, part):
    """One (key, prompt, answer) drawn from the task's train or eval part of its value space."""
    if task == "sentiment":
        return gen_sentiment_in(rng, part)
    g = {"sql": gen_sql, "json": gen_json, "date": gen_date, "numbers": gen_numbers}[task]
    while True:
        key, prompt, answer = g(rng)
        if in_eval_part(task, key) == (part == "eval"):
            return key, prompt, answer


def make_splits(task, seed=SEED):
    """train / heldout / routing, disjoint in their keys (underlying values)."""
    out, used = {}, set()
    for split, part, n in [("heldout", "eval", N_HELDOUT), ("routing", "eval", N_ROUTING),
                           ("train", "train", N_TRAIN)]:
        rng = random.Random(f"{seed}:{task}:{split}")
        rows, tries = [], 0
        while len(rows) < n:
            tries += 1
            assert tries < 200 * n, (task, split, len(rows))
            key, prompt, answer = gen_in(task, rng, part)
            if key in used:
                continue
            used.add(key)
            assert "\n" not in answer and answer == answer.strip()
            rows.append({"prompt": prompt, "answer": answer, "key": key})
        out[split] = rows
    keys = {s: {r["key"] for r in rows} for s, rows in out.items()}
    assert not (keys["train"] & keys["heldout"]) and not (keys["train"] & keys["routing"])
    assert not (keys["heldout"] & keys["routing"])
    return out


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}, ensure_ascii=False) + "\n")
    os.chmod(path, 0o644)


def write_data(task, splits, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(splits["train"], os.path.join(out_dir, "train.jsonl"))
    write_jsonl(splits["heldout"], os.path.join(out_dir, "heldout.jsonl"))
    routing = {"description": DESCRIPTIONS[task], "examples": [r["prompt"] for r in splits["routing"]]}
    path = os.path.join(out_dir, "routing.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(routing, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------------
# Training and evaluation (torch, transformers, peft)
# ---------------------------------------------------------------------------------------------
torch = None


def import_torch():
    global torch, transformers, load_file, save_file, LoraConfig, PeftModel, get_peft_model
    global AutoModelForCausalLM, AutoTokenizer, dump_json
    import torch as _torch
    import transformers as _transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from refutil import dump_json
    torch, transformers = _torch, _transformers
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_base():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    return model


def load_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)


def chat_ids(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, list):
        out = out["input_ids"]
    return list(out)


def build_example(tok, prompt, answer):
    """(ids, labels): the chat-rendered prompt, then answer + <|im_end|> (the only labelled tokens)."""
    p = chat_ids(tok, [{"role": "user", "content": prompt}], True)
    full = chat_ids(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                    False)
    assert full[: len(p)] == p
    end = full.index(EOS, len(p)) + 1
    ids = full[:end]
    return ids, [-100] * len(p) + ids[len(p):]


def pad_batch(batch):
    L = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), L), EOS, dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for j, (x, y) in enumerate(batch):
        ids[j, : len(x)] = torch.tensor(x)
        lab[j, : len(y)] = torch.tensor(y)
        att[j, : len(x)] = 1
    return ids, lab, att


def answer_token_logprobs(pm, ids, lab, att):
    """Log-probabilities of the labelled tokens, each predicted from the position before it.

    The same quantity as the causal-LM loss of transformers (which is its negative mean), but
    lm_head and the softmax run only at the labelled positions (answer + <|im_end|>, about a third
    of the sequence), not at every position. Returns (flat log-probs, batch row of each)."""
    causal = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    hidden = causal.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
    tgt = lab[:, 1:]
    mask = tgt != -100
    logits = causal.lm_head(hidden[mask]).float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(tgt)[mask]
    return lp, rows


def train(task, tok, splits, out_dir, rank, alpha, steps, extra=None):
    random.seed(SEED)
    torch.manual_seed(SEED)
    examples = [build_example(tok, r["prompt"], r["answer"]) for r in splits["train"]]
    model = load_base()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    rng = random.Random(SEED)
    order, losses = [], []
    t0 = time.time()
    for step in range(steps):
        if len(order) < BATCH:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:BATCH], order[BATCH:]
        ids, lab, att = pad_batch([examples[i] for i in idx])
        lp, _ = answer_token_logprobs(pm, ids, lab, att)
        loss = -lp.mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        if step % 10 == 0 or step == steps - 1:
            print(f"  {task} r{rank} step {step:3d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
    seconds = time.time() - t0

    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            acfg = json.load(f)
    if os.path.exists(out_dir):
        for fn in ("adapter_model.safetensors", "adapter_config.json", "training.json"):
            if os.path.exists(os.path.join(out_dir, fn)):
                os.remove(os.path.join(out_dir, fn))
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())},
              os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    acfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    acfg["inference_mode"] = True
    acfg["target_modules"] = sorted(acfg["target_modules"])
    assert acfg["target_modules"] == sorted(TARGETS)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for fn in ("adapter_model.safetensors", "adapter_config.json"):
        os.chmod(os.path.join(out_dir, fn), 0o644)
    size = os.path.getsize(os.path.join(out_dir, "adapter_model.safetensors"))
    print(f"  {task} r{rank}: {len(tensors)} tensors, {size} bytes, {seconds:.0f} s "
          f"({seconds / steps:.2f} s/step)", flush=True)
    info = {"task": task, "seed": SEED, "steps": steps, "batch": BATCH, "lr": LR,
            "lr_schedule": "linear decay to 0", "optimizer": "AdamW (weight_decay 0)",
            "rank": rank, "alpha": alpha, "scale": alpha / rank, "targets": sorted(TARGETS),
            "layers": "all 30", "dropout": 0.0, "weights_dtype": "bfloat16",
            "n_train": len(examples), "examples_seen": steps * BATCH,
            "seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 3),
            "loss": losses, "adapter_bytes": size}
    info.update(extra or {})
    return info


def generate_greedy(model, tok, prompts, max_new_tokens, batch=25):
    """Greedy answers, each cut at its <|im_end|>. Prompts are sorted by length and run in batches
    of `batch`, left-padded (attention mask 0 on the padding; generate() derives the position ids
    from the mask), so padding is short; rows stop at <|im_end|> individually."""
    enc = [chat_ids(tok, [{"role": "user", "content": p}], True) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), i))
    out = [None] * len(prompts)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            chunk = order[s: s + batch]
            L = max(len(enc[i]) for i in chunk)
            x = torch.full((len(chunk), L), EOS, dtype=torch.long)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, i in enumerate(chunk):
                x[j, L - len(enc[i]):] = torch.tensor(enc[i])
                att[j, L - len(enc[i]):] = 1
            g = model.generate(input_ids=x, attention_mask=att, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=EOS)
            for j, i in enumerate(chunk):
                new = g[j, L:].tolist()
                if EOS in new:
                    new = new[: new.index(EOS)]
                out[i] = tok.decode(new, skip_special_tokens=True)
    return out


def answer_logprobs(model, tok, rows, batch=8):
    """Teacher-forced log-likelihood of answer + <|im_end|> for each row: (sum, n_tokens)."""
    res = []
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            exs = [build_example(tok, r["prompt"], r["answer"]) for r in rows[s: s + batch]]
            ids, lab, att = pad_batch(exs)
            lp, which = answer_token_logprobs(model, ids, lab, att)
            for j in range(len(exs)):
                res.append((lp[which == j].sum().item(), int((which == j).sum().item())))
    return res


def evaluate(model, tok, rows, max_new_tokens):
    t0 = time.time()
    outs = generate_greedy(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    lps = answer_logprobs(model, tok, rows)
    exact = [o.strip() == r["answer"] for o, r in zip(outs, rows)]
    return {
        "exact_match": round(sum(exact) / len(rows), 4),
        "mean_answer_logprob": round(sum(s for s, _ in lps) / len(lps), 4),
        "mean_token_logprob": round(sum(s for s, _ in lps) / sum(n for _, n in lps), 4),
        "seconds": round(time.time() - t0, 1),
    }, outs


def max_new_tokens_for(tok, rows):
    """Longest answer in tokens, + <|im_end|> + 3 spare (a longer output cannot match anyway)."""
    return max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 4


def versions():
    import peft
    import tokenizers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "tokenizers": tokenizers.__version__}


def reload_adapter(out_dir):
    pm = PeftModel.from_pretrained(load_base(), out_dir)
    pm.eval()
    return pm


def base_eval(task, tok, rows, mnt, base_cache):
    """The base model's held-out results; kept in memory and on disk in the cache (the base never
    changes, and its rambling answers are the slowest part of evaluation)."""
    if task not in base_cache:
        key = hashlib.sha256(json.dumps([rows, mnt, versions(), GGUF], sort_keys=True).encode()).hexdigest()
        path = os.path.join(CACHE, "task-adapters-base-eval", f"{task}-{key[:16]}.json")
        if os.path.exists(path):
            with open(path) as f:
                base_cache[task] = tuple(json.load(f))
            print(f"  {task}: base results from {path}", flush=True)
        else:
            base_cache[task] = evaluate(load_base(), tok, rows, mnt)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(base_cache[task], f)
    return base_cache[task]


def run_task(task, tok, splits, out_dir, steps, base_cache):
    info = train(task, tok, splits, out_dir, RANK, ALPHA, steps)
    rows = splits["heldout"]
    mnt = max_new_tokens_for(tok, rows)
    base_res, base_outs = base_eval(task, tok, rows, mnt, base_cache)
    ad_res, ad_outs = evaluate(reload_adapter(out_dir), tok, rows, mnt)
    info["heldout"] = {"n": len(rows), "max_new_tokens": mnt, "decoding": "greedy, stop at <|im_end|>",
                       "exact_match_rule": "generated text (specials skipped) .strip() == answer",
                       "base": base_res, "adapter": ad_res,
                       "samples": [{"prompt": r["prompt"], "answer": r["answer"], "base": b, "adapter": a}
                                   for r, b, a in list(zip(rows, base_outs, ad_outs))[:5]]}
    info["versions"] = versions()
    dump_json(info, os.path.join(out_dir, "training.json"))
    print(f"  {task}: held-out exact match base {base_res['exact_match']:.2f} -> adapter "
          f"{ad_res['exact_match']:.2f}; mean answer logprob {base_res['mean_answer_logprob']:.2f} -> "
          f"{ad_res['mean_answer_logprob']:.2f}", flush=True)
    return info


def run_sweep(tok, splits, out_root, steps, base_cache, tasks_out):
    task = SWEEP_TASK
    rows = splits["heldout"]
    mnt = max_new_tokens_for(tok, rows)
    base_eval(task, tok, rows, mnt, base_cache)
    summary = {"task": task, "why": "SQL has the most varied input->output mapping of the five tasks "
               "(18 templates combining departments, cities, names, numbers and clauses), so it "
               "needs the most adapter capacity; the other answers are copies or short classes.",
               "seed": SEED, "steps": steps, "batch": BATCH, "lr": LR, "targets": sorted(TARGETS),
               "alpha": "2 * rank (scale 2)", "n_heldout": len(rows), "max_new_tokens": mnt,
               "base": base_cache[task][0], "ranks": []}
    for r in SWEEP_RANKS:
        d = os.path.join(out_root, f"{task}-r{r}")
        reuse = os.path.join(tasks_out, task)
        tj = os.path.join(reuse, "training.json")
        if r == RANK and os.path.exists(tj) and json.load(open(tj))["steps"] == steps:
            # the task adapter itself: same data, steps, seed, rank, alpha and targets
            os.makedirs(d, exist_ok=True)
            for fn in ("adapter_config.json", "adapter_model.safetensors", "training.json"):
                shutil.copyfile(os.path.join(reuse, fn), os.path.join(d, fn))
            info = json.load(open(tj))
            res = info["heldout"]["adapter"]
            print(f"  sweep r{r}: reused {reuse}", flush=True)
        else:
            info = train(task, tok, splits, d, r, 2 * r, steps)
            res, _ = evaluate(reload_adapter(d), tok, rows, mnt)
            info["heldout"] = {"n": len(rows), "max_new_tokens": mnt, "base": base_cache[task][0],
                               "adapter": res}
            info["versions"] = versions()
            dump_json(info, os.path.join(d, "training.json"))
        summary["ranks"].append({"rank": r, "alpha": 2 * r, "steps": info["steps"],
                                 "seconds": info["seconds"], "final_loss": info["loss"][-1],
                                 "adapter_bytes": info["adapter_bytes"],
                                 "exact_match": res["exact_match"],
                                 "mean_answer_logprob": res["mean_answer_logprob"],
                                 "mean_token_logprob": res["mean_token_logprob"]})
        print(f"  sweep r{r}: exact match {res['exact_match']:.2f}, logprob "
              f"{res['mean_answer_logprob']:.2f}", flush=True)
    summary["adapters_dir"] = "${LORAMUX_CACHE:-~/.cache/loramux}/adapters/rank-sweep/"
    summary["versions"] = versions()
    dump_json(summary, os.path.join(tasks_out, "rank_sweep.json"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "adapters", "tasks"))
    ap.add_argument("--only", choices=TASKS, action="append", help="train only this task (repeatable)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--sweep", dest="sweep", action="store_true", default=None,
                    help="run the rank sweep (default: only when no --only is given)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--data-only", action="store_true", help="write the data files, train nothing")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    tasks = args.only or TASKS
    sweep = args.sweep if args.sweep is not None else not args.only
    splits = {t: make_splits(t) for t in TASKS}
    for t in tasks:
        write_data(t, splits[t], os.path.join(out, t))
        ex = splits[t]["heldout"][0]
        print(f"{t}: {ex['prompt']!r} -> {ex['answer']!r}", flush=True)
    if args.data_only:
        return
    import_torch()
    tok = load_tokenizer()
    base_cache = {}
    t0 = time.time()
    for t in tasks:
        run_task(t, tok, splits[t], os.path.join(out, t), args.steps, base_cache)
    if sweep:
        run_sweep(tok, splits[SWEEP_TASK], os.path.join(CACHE, "adapters", "rank-sweep"), args.steps,
                  base_cache, out)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
