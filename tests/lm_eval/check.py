"""Checks lm-eval-harness's results against a reference computed independently through the server.

    check.py --url http://127.0.0.1:P --tasks DIR --out DIR --base NAME [--bench quality.json]

DIR (--tasks) is make_tasks.py's output; --out holds one lm-eval output folder per served model:
<out>/<base> (all three tasks), <out>/date (loramux_date_gen, loramux_date_ll) and
<out>/sentiment (loramux_sentiment_mc), each with lm-eval's results_*.json and --log_samples
files. The reference does what `loramux bench quality` does, over HTTP and without lm-eval:

- exact match: /v1/chat/completions, greedy, the same token budget, `output.strip() == answer`;
  lm-eval's per-item exact_match and its output text must be the same as the reference's;
- log-likelihood: the conversation with the answer as the assistant's turn, rendered by the
  server's own chat template (/tokenize with messages), cut after <|im_end|>, scored with
  vLLM's `prompt_logprobs` (not lm-eval's echo/logprobs path). lm-eval tokenizes the context
  and context+continuation separately and moves the context's trailing whitespace into the
  continuation (`_encode_pair`): the "\\n" that ends "<|im_start|>assistant\\n" is scored with
  the answer. So the checker re-derives lm-eval's split, requires the whole sequence to be the
  reference's tokens, and compares lm-eval's value with the reference's sum over the same
  tokens ("\\n" + answer + <|im_end|>) within 1e-3; the answer-only sum (bench quality's
  definition) is shown beside it. Greedy flags, multiple-choice picks and every aggregate in
  results_*.json are checked the same way.

With --bench (a `loramux bench quality` result for the same items), its per-item exact match
(base and unmerged adapter) must equal lm-eval's, and its answer log-likelihoods must equal
lm-eval's minus the "\\n" token's (within 1e-3).

Also asserts real behaviour: the date adapter's exact match and answer log-likelihood beat the
base's. Prints a table; exits non-zero on any mismatch.
"""

import argparse
import glob
import json
import math
import os
import sys
import urllib.request

TOL = 1e-3
DATE_GEN, DATE_LL, SENT_MC = "loramux_date_gen", "loramux_date_ll", "loramux_sentiment_mc"

failures = []


def fail(msg):
    failures.append(msg)
    print(f"MISMATCH: {msg}")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


class Server:
    def __init__(self, url):
        self.url = url
        self._tok = {}

    def tokenize(self, text):
        if text not in self._tok:
            self._tok[text] = post(f"{self.url}/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
        return self._tok[text]

    def chat_tokens(self, messages, add_generation_prompt):
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return post(f"{self.url}/tokenize", body)["tokens"]

    def greedy(self, model, prompt, max_tokens):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
        return post(f"{self.url}/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def prompt_logprobs(self, model, ids):
        """(logprob, rank) of tokens 1.. of `ids` under `model` (vLLM's prompt_logprobs)."""
        body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        entries = post(f"{self.url}/v1/completions", body)["choices"][0]["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None, f"{len(entries)} prompt log-probs for {len(ids)} tokens"
        out = [None]
        for tok, e in zip(ids[1:], entries[1:]):
            e = e[str(tok)]
            out.append((e["logprob"], e["rank"]))
        return out


def lm_eval_run(out, model):
    """lm-eval's results dict and its samples by task, from <out>/<model>."""
    results = glob.glob(os.path.join(out, model, "**", "results_*.json"), recursive=True)
    assert len(results) == 1, f"expected one results file for {model}, found {results}"
    with open(results[0]) as f:
        res = json.load(f)
    samples = {}
    for task in res["results"]:
        files = glob.glob(os.path.join(out, model, "**", f"samples_{task}_*.jsonl"), recursive=True)
        assert len(files) == 1, f"expected one samples file for {model}/{task}, found {files}"
        with open(files[0]) as f:
            rows = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        samples[task] = rows
    return res, samples


def check_docs(tag, rows, items):
    if [r["doc"]["prompt"] for r in rows] != [i["prompt"] for i in items]:
        fail(f"{tag}: lm-eval's documents are not the held-out items in order")
        return False
    return True


def exact_match(srv, model, rows, items, budget, res, tag):
    """Per-item comparison of lm-eval's generate_until exact match with the reference."""
    lm_em, ref_em, same_text = [], [], 0
    for row, item in zip(rows, items):
        out = row["resps"][0][0]
        ref = srv.greedy(model, item["prompt"], budget)
        lm_em.append(float(row["exact_match"]))
        ref_em.append(float(ref.strip() == item["answer"]))
        same_text += out == ref
        if lm_em[-1] != ref_em[-1]:
            fail(f"{tag} item {row['doc_id']}: lm-eval exact_match {lm_em[-1]} ({out!r}), reference {ref_em[-1]} ({ref!r})")
        elif out != ref:
            fail(f"{tag} item {row['doc_id']}: lm-eval output {out!r}, reference {ref!r}")
    agg = res["results"][DATE_GEN]["exact_match,none"]
    if abs(agg - mean(lm_em)) > 1e-9:
        fail(f"{tag}: results exact_match {agg} is not the mean of its samples {mean(lm_em)}")
    return {"lm": agg, "ref": mean(ref_em), "same": sum(a == b for a, b in zip(lm_em, ref_em)), "n": len(items), "same_text": same_text, "em": lm_em}


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def score(srv, model, prompt, answer, context, continuation, eot):
    """Reference for one lm-eval loglikelihood request: (lm-eval-span sum, answer-only sum,
    "\\n" token's log-prob, greedy over lm-eval's span, note)."""
    user = [{"role": "user", "content": prompt}]
    head = srv.chat_tokens(user, True)
    full = srv.chat_tokens(user + [{"role": "assistant", "content": answer}], False)
    eot_id = srv.tokenize(eot)[0]
    full = full[: full.index(eot_id, len(head)) + 1]
    assert full[: len(head)] == head, f"the answer turn does not extend the prompt: {prompt!r}"
    # lm-eval's split (TemplateLM._encode_pair with the remote tokenizer).
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = srv.tokenize(context + continuation)
    start = len(srv.tokenize(context))
    lp = srv.prompt_logprobs(model, whole)
    same_span = sum(l for l, _ in lp[start:])
    greedy = all(r == 1 for _, r in lp[start:])
    if whole != full:
        # Not the tokens the reference scores an answer with: compare on lm-eval's own tokens,
        # but there is no answer-only value to show.
        return same_span, None, None, greedy, "tokenization differs"
    if start != len(head) - 1:
        return same_span, None, None, greedy, f"lm-eval's continuation starts at token {start}, the answer at {len(head)}"
    return same_span, sum(l for l, _ in lp[len(head) :]), lp[start][0], greedy, None


def loglik(srv, model, rows, items, res, task, tag, eot, choices=None):
    """Per-request comparison of lm-eval's log-likelihoods with the reference."""
    max_delta, lm_gold, ref_gold, ref_answer_gold, newline, notes = 0.0, [], [], [], [], set()
    lm_acc, ref_acc, same_acc = [], [], 0
    for row, item in zip(rows, items):
        args = [row["arguments"][f"gen_args_{k}"] for k in range(len(row["arguments"]))]
        resps = [(float(r[0][0]), r[0][1] in ("True", True)) for r in row["resps"]]
        conts = [c + eot for c in choices] if choices else [item["answer"] + eot]
        gold = choices.index(item["answer"]) if choices else 0
        refs = []
        for k, (a, (ll, greedy)) in enumerate(zip(args, resps)):
            if a["arg_1"] != conts[k]:
                fail(f"{tag} item {row['doc_id']}: lm-eval scored {a['arg_1']!r}, expected {conts[k]!r}")
            answer = conts[k][: -len(eot)]
            same, ans, nl, ref_greedy, note = score(srv, model, item["prompt"], answer, a["arg_0"], a["arg_1"], eot)
            if note:
                notes.add(note)
            delta = abs(ll - same)
            max_delta = max(max_delta, delta)
            if delta > TOL or not math.isfinite(ll):
                fail(f"{tag} item {row['doc_id']} {answer!r}: lm-eval {ll:.6f}, reference {same:.6f}")
            if greedy != ref_greedy:
                fail(f"{tag} item {row['doc_id']} {answer!r}: lm-eval is_greedy {greedy}, reference {ref_greedy}")
            refs.append((same, ans, nl, ref_greedy))
        lm_gold.append(resps[gold][0])
        ref_gold.append(refs[gold][0])
        ref_answer_gold.append(refs[gold][1])
        newline.append(refs[gold][2])
        if choices:
            lm_pick = max(range(len(resps)), key=lambda k: resps[k][0])
            ref_pick = max(range(len(refs)), key=lambda k: refs[k][0])
            lm_acc.append(float(row["acc"]))
            ref_acc.append(float(ref_pick == gold))
            if float(lm_pick == gold) != lm_acc[-1]:
                fail(f"{tag} item {row['doc_id']}: lm-eval acc {row['acc']} but its best choice is {lm_pick}")
        else:
            lm_acc.append(float(row["acc"]))
            ref_acc.append(float(refs[0][3]))
        same_acc += lm_acc[-1] == ref_acc[-1]
        if lm_acc[-1] != ref_acc[-1]:
            fail(f"{tag} item {row['doc_id']}: lm-eval acc {lm_acc[-1]}, reference {ref_acc[-1]}")
    r = res["results"][task]
    if abs(r["acc,none"] - mean(lm_acc)) > 1e-9:
        fail(f"{tag}: results acc {r['acc,none']} is not the mean of its samples {mean(lm_acc)}")
    if "perplexity,none" in r:
        # lm-eval's perplexity aggregation: exp(-mean log-likelihood).
        want = math.exp(-mean(lm_gold))
        if abs(r["perplexity,none"] - want) > 1e-6 * want:
            fail(f"{tag}: results perplexity {r['perplexity,none']} is not exp(-mean LL) {want}")
    answer_only = None if None in ref_answer_gold else mean(ref_answer_gold)
    return {
        "lm_acc": r["acc,none"],
        "ref_acc": mean(ref_acc),
        "same_acc": same_acc,
        "n": len(items),
        "lm_ll": mean(lm_gold),
        "ref_ll": mean(ref_gold),
        "max_delta": max_delta,
        "ref_answer_ll": answer_only,
        "ref_answer": ref_answer_gold,
        "lm_gold": lm_gold,
        "newline": newline,
        "notes": sorted(notes),
    }


def bench_samples(bench, task, variant):
    for t in bench["tasks"]:
        if t["task"] == task:
            for v in t["variants"]:
                if v["variant"] == variant:
                    return v["quality"]["samples"]
    raise KeyError(f"bench quality has no {task}/{variant}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", required=True, help="the base model's served name")
    ap.add_argument("--bench", help="a `loramux bench quality` result over the same items")
    a = ap.parse_args()
    with open(os.path.join(a.tasks, "manifest.json")) as f:
        m = json.load(f)
    srv = Server(a.url)
    eot = m["eot"]
    runs = {name: lm_eval_run(a.out, name) for name in (a.base, "date", "sentiment")}
    versions = {r[0].get("lm_eval_version") for r in runs.values()}

    table, gen, ll, mc = [], {}, {}, {}
    for model in (a.base, "date"):
        res, samples = runs[model]
        if check_docs(f"{model}/{DATE_GEN}", samples[DATE_GEN], m["date"]):
            g = gen[model] = exact_match(srv, model, samples[DATE_GEN], m["date"], m["max_gen_toks"], res, f"{model}/{DATE_GEN}")
            table.append((DATE_GEN, model, "exact_match", f"{g['lm']:.3f}", f"{g['ref']:.3f}", f"{g['same']}/{g['n']} same EM, {g['same_text']}/{g['n']} same text"))
        if check_docs(f"{model}/{DATE_LL}", samples[DATE_LL], m["date"]):
            x = ll[model] = loglik(srv, model, samples[DATE_LL], m["date"], res, DATE_LL, f"{model}/{DATE_LL}", eot)
            table.append((DATE_LL, model, "mean LL", f"{x['lm_ll']:.4f}", answer_col(x), f"max |Δ| {x['max_delta']:.1e}"))
            table.append((DATE_LL, model, "acc (greedy)", f"{x['lm_acc']:.3f}", f"{x['ref_acc']:.3f}", f"{x['same_acc']}/{x['n']} same"))
    for model in (a.base, "sentiment"):
        res, samples = runs[model]
        if check_docs(f"{model}/{SENT_MC}", samples[SENT_MC], m["sentiment"]):
            x = mc[model] = loglik(srv, model, samples[SENT_MC], m["sentiment"], res, SENT_MC, f"{model}/{SENT_MC}", eot, m["choices"])
            table.append((SENT_MC, model, "acc", f"{x['lm_acc']:.3f}", f"{x['ref_acc']:.3f}", f"{x['same_acc']}/{x['n']} same pick"))
            table.append((SENT_MC, model, "mean LL (gold)", f"{x['lm_ll']:.4f}", answer_col(x), f"max |Δ| {x['max_delta']:.1e} (both choices)"))

    if a.bench:
        with open(a.bench) as f:
            bench = json.load(f)
        compare_bench(bench, table, gen, ll, mc, a.base)

    # Real behaviour: the date adapter answers what the base cannot.
    if a.base in gen and "date" in gen and not gen["date"]["lm"] > gen[a.base]["lm"]:
        fail(f"the date adapter's exact match {gen['date']['lm']} is not above the base's {gen[a.base]['lm']}")
    if a.base in ll and "date" in ll and not ll["date"]["lm_ll"] > ll[a.base]["lm_ll"]:
        fail(f"the date adapter's answer log-likelihood {ll['date']['lm_ll']} is not above the base's {ll[a.base]['lm_ll']}")

    print_table(table, versions, m)
    notes = {n for d in (ll, mc) for x in d.values() for n in x["notes"]}
    for n in sorted(notes):
        print(f"note: {n}")
    if failures:
        print(f"FAILED: {len(failures)} mismatch(es)")
        return 1
    print("lm-eval agrees with the reference on every item")
    return 0


def answer_col(x):
    """Reference over lm-eval's tokens; answer-only (bench quality's definition) in brackets."""
    ans = "n/a" if x["ref_answer_ll"] is None else f"{x['ref_answer_ll']:.4f}"
    return f"{x['ref_ll']:.4f} [ans {ans}]"


def compare_bench(bench, table, gen, ll, mc, base):
    variants = {base: "base", "date": "unmerged", "sentiment": "unmerged"}
    for model, g in gen.items():
        s = bench_samples(bench, "date", variants[model])
        em = [float(x["exact_match"]) for x in s[: g["n"]]]
        same = sum(x == y for x, y in zip(em, g["em"]))
        if len(em) != g["n"] or same != g["n"]:
            fail(f"bench quality date/{variants[model]}: exact match differs from lm-eval's on {g['n'] - same} item(s)")
        table.append((DATE_GEN, model, "EM vs bench quality", f"{g['lm']:.3f}", f"{mean(em):.3f}", f"{same}/{g['n']} same EM"))
    for task, d in (("date", ll), ("sentiment", mc)):
        for model, x in d.items():
            s = bench_samples(bench, task, variants[model])[: x["n"]]
            deltas = []
            for k, smp in enumerate(s):
                if x["newline"][k] is None:
                    continue
                deltas.append(abs((x["lm_gold"][k] - x["newline"][k]) - smp["answer_logprob"]))
            worst = max(deltas) if deltas else float("nan")
            if len(deltas) != x["n"] or worst > TOL:
                fail(f"bench quality {task}/{variants[model]}: answer log-likelihoods differ from lm-eval's (minus the \\n token) by up to {worst}")
            name = DATE_LL if task == "date" else SENT_MC
            bench_mean = mean([smp["answer_logprob"] for smp in s])
            table.append((name, model, "answer LL vs bench", f"{mean([a - b for a, b in zip(x['lm_gold'], x['newline'])]):.4f}", f"{bench_mean:.4f}", f"max |Δ| {worst:.1e}"))


def print_table(table, versions, m):
    print()
    print(f"lm-eval {', '.join(sorted(v for v in versions if v))} against the server reference ({len(m['date'])} date, {len(m['sentiment'])} sentiment items)")
    head = ("task", "model", "metric", "lm-eval", "reference", "per item")
    widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
    for r in [head] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print("LL: sum of log-probs over lm-eval's continuation tokens (\"\\n\" + answer + <|im_end|>); "
          "[ans ...] is the reference over answer + <|im_end|> only (bench quality's definition).")


if __name__ == "__main__":
    sys.exit(main())
