"""Quality of the checks: recall on planted defects, false flags on clean subjects.

    .venv/bin/python benchmarks/quality.py                      # everything (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/quality.py --only near_duplicates language
    .venv/bin/python benchmarks/quality.py --no-sweep           # default configs only (~30 s)

Prints one Markdown table per check (defect class, planted, found, recall, false flags /
clean subjects) plus the tables behind the parameter choices; `docs/checks-text.md` quotes
the output.  Everything is seeded: the same code and data print the same numbers.

Data
----
* Real prompts and texts: `data/source/*.jsonl` (in the repository) and, when present,
  `../shared/data/*.jsonl` (HH-RLHF harmless test, LLaMA-Factory DPO en/zh demos); locales
  en / en / zh / ja-JP.  Prompts are deduplicated by their normalised text; "distinct"
  prompts are additionally one per opening user turn (HH-RLHF holds several continuations
  of one conversation, which really are near duplicates of each other).
* Planted-defect batches: `tests/synth.py` (`make_planted`, as `tests/test_planted_targets.py`
  uses it) for the duplicate checks and the statistical checks.

Checks measured
---------------
* near_duplicates: one edited copy per distinct real prompt and edit class (case, punctuation,
  whitespace, one word added / dropped / replaced; in Chinese/Japanese a "word" is 2
  characters), one frame per class (originals + copies), so a copy can only be found through
  its own original.  Found = the copy is flagged ``near_duplicate`` and shares its original's
  ``near_dup_cluster`` (what keeps the two in one split).  False flags: distinct real prompts
  flagged.  Also: the S-curve of the banding (exact, Monte Carlo with the estimate, and
  measured on real prompts with 1-15 word edits), and sweeps over threshold, shingle size and
  num_perm.
* language: every real row with its locale (expected: no flag, except the one reply in
  `ja_handwritten.jsonl` written in English on purpose, `ja-031`), planted mismatches (a real
  reply of another language replacing response_b), short and code-only replies.
* duplicates: re-delivered judgments (same content, new comparison_id; half with the a/b
  names swapped, half with surrounding whitespace / CRLF added) and identical-response pairs (same text, or differing only in case /
  whitespace) planted into synth batches, with near-miss controls that must not be flagged;
  the exact duplicate rows the LLaMA-Factory files really contain.
* statistical checks (synth): position_bias, length_bias, low_reliability, low_agreement,
  label_imbalance, too_easy, and "insufficient_data" for annotators with 3-12 judgments.
* consensus: accuracy against known answers on judge panels (``benchmarks/consensus_quality.py``,
  with majority vote and crowd-kit's Dawid-Skene; needs crowd-kit, see requirements-bench.txt).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.checks import duplicates, language  # noqa: E402
from pipeline.checks import near_duplicates as nd  # noqa: E402
from pipeline.ingest import judgments_from_records  # noqa: E402
from schemas.policy import ChecksConfig, LanguageConfig, NearDuplicateConfig  # noqa: E402
from schemas.text import normalize_text  # noqa: E402

SOURCE = ROOT / "data" / "source"
SHARED = ROOT.parent / "shared" / "data"
SOURCE_LOCALE = {"hh_harmless": "en", "llamafactory_dpo_en": "en", "llamafactory_dpo_zh": "zh", "ja_handwritten": "ja-JP"}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


# ---------------------------------------------------------------- output helpers
def md_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def pct(n: int, d: int) -> str:
    return f"{n / d:.3f}" if d else "-"


def ff(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.1f} %)" if d else "-"


def quality_row(cls: str, planted: int, found: int, false_flags: int | None, clean: int | None) -> list[object]:
    return [cls, planted, found, pct(found, planted) if planted else "-",
            ff(false_flags, clean) if clean else "-"]


QUALITY_HEADERS = ["defect class", "planted", "found", "recall", "false flags / clean subjects"]


def section(title: str) -> None:
    print(f"\n### {title}\n", flush=True)


# ---------------------------------------------------------------- real data
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _messages(p) -> list[dict]:
    return [{"role": "user", "content": p}] if isinstance(p, str) else [{"role": m["role"], "content": m["content"]} for m in p]


def real_items() -> list[dict]:
    """Every real row as {source, locale, prompt (messages), a, b, id}; shared copies first."""
    items = []
    if SHARED.exists():
        for path in sorted(SHARED.glob("*.jsonl")):
            for r in _read_jsonl(path):
                items.append({"source": f"shared/{path.stem}", "locale": r.get("locale") or "en", "prompt": _messages(r["prompt"]),
                              "a": r["response_a"], "b": r["response_b"], "id": r["comparison_id"]})
    for path in sorted(SOURCE.glob("*.jsonl")):
        for r in _read_jsonl(path):
            items.append({"source": f"source/{path.stem}", "locale": SOURCE_LOCALE[path.stem], "prompt": _messages(r["prompt"]),
                          "a": r["chosen"], "b": r["rejected"], "id": r["id"]})
    return items


def shingled(msgs: list[dict]) -> str:
    """What the near-duplicates check shingles: non-system turns, joined."""
    return "\n".join(normalize_text(m["content"]) for m in msgs if m["role"] != "system")


def n_words(msgs: list[dict]) -> int:
    """Word count of the shingled text; a CJK character counts as half a word (~2 chars a word)."""
    t = shingled(msgs)
    cjk = len(_CJK.findall(t))
    return len(_CJK.sub(" ", t).split()) + cjk // 2


def distinct_prompts(items: list[dict], *, openings: bool = True) -> tuple[list[tuple[str, list[dict]]], dict[str, int]]:
    """(locale, messages) unique by normalised text, then (``openings``) one per opening user turn."""
    seen_text, seen_first, out = set(), set(), []
    n_text = 0
    for it in items:
        t = shingled(it["prompt"])
        if not t or t in seen_text:
            continue
        seen_text.add(t)
        n_text += 1
        if not openings:
            out.append((it["locale"], it["prompt"]))
            continue
        first = next((m["content"] for m in it["prompt"] if m["role"] == "user"), "")
        key = re.sub(r"\W+", " ", first.lower()).strip()
        if key in seen_first:
            continue
        seen_first.add(key)
        out.append((it["locale"], it["prompt"]))
    return out, {"rows": len(items), "distinct_texts": n_text, "distinct_openings": len(out)}


# ---------------------------------------------------------------- near duplicates
VOCAB = ("really", "please", "quickly", "today", "maybe", "also", "exactly", "again", "now", "just", "actually",
         "honestly", "basically", "still", "perhaps", "simply", "certainly", "usually", "briefly", "kindly")
CJK_VOCAB = {"zh": ("非常", "今天", "现在", "请问", "一下", "真的", "可能", "已经"),
             "ja": ("少し", "今日", "本当", "多分", "是非", "早く", "必ず", "一度")}
EDITS = ("case", "punctuation", "whitespace", "word added", "word dropped", "word replaced")
WORD_EDITS = EDITS[3:]
BUCKETS = ((1, 4), (5, 10), (11, 30), (31, 60), (61, 10**9))


def _bucket(n: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= n <= hi:
            return f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}"
    return "0"


def _pick_turn(msgs: list[dict], rng: random.Random) -> int:
    """A non-system turn, chosen with probability proportional to its length in tokens."""
    idx = [k for k, m in enumerate(msgs) if m["role"] != "system" and m["content"].strip()]
    w = [max(1, len(msgs[k]["content"].split()) + len(_CJK.findall(msgs[k]["content"])) // 2) for k in idx]
    return rng.choices(idx, weights=w)[0]


def edit_text(t: str, kind: str, rng: random.Random, lang_hint: str) -> str:
    cjk = _CJK.search(t) is not None and len(_CJK.findall(t)) > len(t.split())
    if kind == "word added":
        if cjk:
            k = rng.randrange(len(t) + 1)
            return t[:k] + rng.choice(CJK_VOCAB[lang_hint]) + t[k:]
        w = t.split(" ")
        low = t.lower()
        w.insert(rng.randrange(len(w) + 1), rng.choice([v for v in VOCAB if v not in low] or VOCAB))
        return " ".join(w)
    if kind == "word dropped":
        if cjk:
            k = rng.randrange(max(1, len(t) - 1))
            return t[:k] + t[k + 2:]
        w = t.split(" ")
        if len(w) < 2:
            return t
        del w[rng.randrange(len(w))]
        return " ".join(w)
    if kind == "word replaced":
        if cjk:
            k = rng.randrange(max(1, len(t) - 1))
            return t[:k] + rng.choice(CJK_VOCAB[lang_hint]) + t[k + 2:]
        w = t.split(" ")
        low = t.lower()
        w[rng.randrange(len(w))] = rng.choice([v for v in VOCAB if v not in low] or VOCAB)
        return " ".join(w)
    raise ValueError(kind)


def edit(msgs: list[dict], kind: str, rng: random.Random, locale: str) -> list[dict]:
    """A copy of a prompt with one edit of the given class."""
    msgs = [dict(m) for m in msgs]
    hint = "ja" if locale.startswith("ja") else "zh"
    if kind == "case":
        f = str.upper if rng.random() < 0.5 else str.lower
        for m in msgs:
            m["content"] = f(m["content"])
    elif kind == "punctuation":
        for m in msgs:
            t = re.sub(r"[?.!,;:。？！，、]+(?=\s|$)", "", m["content"])
            m["content"] = t + rng.choice(["?", "!!", " ...", ".", "？"]) if m["role"] == "user" else t
    elif kind == "whitespace":
        for m in msgs:
            m["content"] = "  " + re.sub(r"[ \n]+", lambda _: rng.choice([" ", "  ", "\n", " \t ", "\n\n"]), m["content"]) + " \n"
    else:
        k = _pick_turn(msgs, rng)
        msgs[k]["content"] = edit_text(msgs[k]["content"], kind, rng, hint)
    return msgs


def frame_of(prompts: list[list[dict]]) -> pl.DataFrame:
    """One judgment per prompt, each its own pair (pair ids p-00000, ...)."""
    return judgments_from_records([{
        "comparison_id": f"c-{i:05d}", "pair_id": f"p-{i:05d}", "prompt": msgs, "response_a": f"answer one {i}",
        "response_b": f"answer two {i}", "label": "a", "annotator_id": "rev-1", "annotator_kind": "human",
    } for i, msgs in enumerate(prompts)])


def _row_of(pair_id: str) -> int:
    return int(pair_id.split("-")[1])


def edited_copies(bases: list[tuple[str, list[dict]]], kind: str, seed: int) -> list[tuple[int, list[dict]]]:
    """(base index, edited copy) for every base whose copy differs from it after normalisation."""
    rng = random.Random(f"{seed}-{kind}")
    out = []
    for i, (loc, msgs) in enumerate(bases):
        cp = edit(msgs, kind, rng, loc)
        if shingled(cp) != shingled(msgs):
            out.append((i, cp))
    return out


def run_recall(bases, kind: str, cfg: NearDuplicateConfig, seed: int = 0) -> dict:
    """Originals + one copy each of ``kind``: per copy, flagged and in its original's cluster?"""
    copies = edited_copies(bases, kind, seed)
    prompts = [m for _, m in bases] + [c for _, c in copies]
    res = nd.run(frame_of(prompts), cfg)
    flagged = {_row_of(s) for s in res.flags["subject_id"].to_list()}
    cl = {_row_of(p): c for p, c in res.tables["clusters"].iter_rows()}
    n = len(bases)
    found = [(n + k) in flagged and cl[n + k] == cl[i] for k, (i, _) in enumerate(copies)]
    sizes = [n_words(bases[i][1]) for i, _ in copies]
    return {"planted": len(copies), "found": int(sum(found)), "skipped": n - len(copies),
            "by_bucket": _by_bucket(sizes, found)}


def _by_bucket(sizes: list[int], found: list[bool]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s, f in zip(sizes, found, strict=True):
        b = out.setdefault(_bucket(s), [0, 0])
        b[0] += int(f)
        b[1] += 1
    return out


def false_flags(bases, cfg: NearDuplicateConfig) -> tuple[int, int, pl.DataFrame]:
    res = nd.run(frame_of([m for _, m in bases]), cfg)
    return res.flags.height, len(bases), res.flags


def s_curve(cfg: NearDuplicateConfig, rng: np.random.Generator, sims: int = 20000) -> list[list[object]]:
    b, r = nd.band_params(cfg)
    rows = []
    for j in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        p_cand = 1 - (1 - j ** r) ** b
        eq = rng.random((sims, cfg.num_perm)) < j  # equal signature values under the MinHash model
        cand = eq[:, : b * r].reshape(sims, b, r).all(axis=2).any(axis=1)
        est_ok = eq.mean(axis=1) >= cfg.threshold
        rows.append([f"{j:.2f}", f"{p_cand:.3f}", f"{est_ok.mean():.3f}", f"{(cand & est_ok).mean():.3f}"])
    return rows


def empirical_s_curve(bases, cfg: NearDuplicateConfig, seed: int = 3) -> list[list[object]]:
    """Real prompts vs copies with 1-15 random word edits: flagged share per true Jaccard bin."""
    rng = random.Random(seed)
    pool = [(loc, m) for loc, m in bases if 5 <= n_words(m) <= 60]
    orig, copy = [], []
    for loc, m in pool:
        q = m
        for _ in range(rng.randint(1, 15)):
            q = edit(q, rng.choice(WORD_EDITS), rng, loc)
        if shingled(q) != shingled(m):
            orig.append(shingled(m))
            copy.append(shingled(q))
    sh_o, c_o = nd.shingle_hashes(orig, cfg.max_chars, cfg.shingle_size)
    sh_c, c_c = nd.shingle_hashes(copy, cfg.max_chars, cfg.shingle_size)
    eo, ec = np.cumsum(c_o), np.cumsum(c_c)
    true_j = []
    for i in range(len(orig)):
        a = set(sh_o[eo[i] - c_o[i]:eo[i]].tolist())
        bb = set(sh_c[ec[i] - c_c[i]:ec[i]].tolist())
        true_j.append(len(a & bb) / len(a | bb))
    index = nd.PromptIndex(cfg)
    n = len(orig)
    index.add([f"o{i}" for i in range(n)] + [f"c{i}" for i in range(n)], orig + copy)
    edges = {(int(x), int(y)) for x, y in index.edges.tolist()}
    hit = [(i, n + i) in edges for i in range(n)]
    b, r = nd.band_params(cfg)
    bins = ((0.3, 0.5), (0.5, 0.6), (0.6, 0.65), (0.65, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.9), (0.9, 1.01))
    rows = []
    tj = np.array(true_j)
    hit_a = np.array(hit)
    for lo, hi in bins:
        m = (tj >= lo) & (tj < hi)
        if m.sum():
            rows.append([f"[{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}", int(m.sum()), f"{hit_a[m].mean():.3f}"])
    return rows


def jaccard_sweep(bases, cfg: NearDuplicateConfig) -> tuple[list[list[object]], list[float]]:
    """Share of one-word-edit copies whose estimated Jaccard to the original is >= t, and share
    of distinct prompts with a neighbour at estimated Jaccard >= t (banding at 0.5)."""
    thresholds = [0.5, 0.6, 0.7, 0.8, 0.9]
    rows = []
    for kind in WORD_EDITS:
        copies = edited_copies(bases, kind, 0)
        so = nd.signatures([shingled(bases[i][1]) for i, _ in copies], cfg)
        sc = nd.signatures([shingled(c) for _, c in copies], cfg)
        est = nd.estimated_jaccard(so, sc)
        rows.append([kind, len(copies)] + [f"{(est >= t).mean():.3f}" for t in thresholds])
    idx = nd.PromptIndex(NearDuplicateConfig(**{**cfg.model_dump(), "threshold": 0.5, "candidate_threshold": 0.5}))
    idx.add([f"k{i}" for i in range(len(bases))], [shingled(m) for _, m in bases])
    best = np.zeros(len(bases))
    for (i, j), jac in zip(idx.edges.tolist(), idx.edge_jaccard.tolist(), strict=True):
        best[i] = max(best[i], jac)
        best[j] = max(best[j], jac)
    rows.append(["distinct prompts with a neighbour (false flags)", len(bases)]
                + [f"{(best >= t).mean():.4f}" for t in thresholds])
    return rows, thresholds


def index_reuse(bases, cfg: NearDuplicateConfig) -> None:
    """Parent version = half of the distinct prompts; child = all of them plus edited copies,
    starting from the parent's saved index (as curate does) vs from scratch."""
    import tempfile

    rng = random.Random(11)
    half = len(bases) // 2
    copies = [edit(bases[i][1], rng.choice(WORD_EDITS), rng, bases[i][0]) for i in rng.sample(range(len(bases)), 200)]
    parent = frame_of([m for _, m in bases[:half]])
    child = frame_of([m for _, m in bases] + copies)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r1 = nd.run(parent, cfg)
        t_parent = time.perf_counter() - t
        nd.save_index(r1, Path(tmp) / "prompt_index")
        t = time.perf_counter()
        r2 = nd.run(child, cfg, index_path=Path(tmp) / "prompt_index.npz")
        t_child = time.perf_counter() - t
        t = time.perf_counter()
        r3 = nd.run(child, cfg)
        t_scratch = time.perf_counter() - t
    same = r2.flags.sort("subject_id").equals(r3.flags.sort("subject_id")) and r2.tables["clusters"].equals(r3.tables["clusters"])
    print(md_table(["run", "prompts in frame", "index before", "prompts hashed", "flags", "seconds"], [
        ["parent (fresh index)", r1.metrics["prompts"], r1.metrics["index_prompts_before"], r1.metrics["prompts_hashed"],
         r1.flags.height, f"{t_parent:.2f}"],
        ["child from the parent's index", r2.metrics["prompts"], r2.metrics["index_prompts_before"],
         r2.metrics["prompts_hashed"], r2.flags.height, f"{t_child:.2f}"],
        ["child from scratch", r3.metrics["prompts"], r3.metrics["index_prompts_before"], r3.metrics["prompts_hashed"],
         r3.flags.height, f"{t_scratch:.2f}"],
    ]))
    print(f"\nChild from the parent's index gives the same flags and clusters as from scratch: {same}.")


def bench_near_duplicates(sweep: bool) -> None:
    items = real_items()
    bases, counts = distinct_prompts(items)
    cfg = NearDuplicateConfig()
    b, r = nd.band_params(cfg)
    section("near_duplicates: recall on edited copies of real prompts, false flags on distinct real prompts")
    print(f"Real prompts: {counts['rows']} rows -> {counts['distinct_texts']} distinct texts -> "
          f"{counts['distinct_openings']} distinct prompts (one per opening user turn); locales "
          + ", ".join(f"{loc} {n}" for loc, n in sorted(_count([loc for loc, _ in bases]).items()))
          + f".  Config: num_perm {cfg.num_perm}, shingle_size {cfg.shingle_size}, threshold {cfg.threshold}, "
          f"candidate_threshold {cfg.candidate_threshold} -> {b} bands x {r} rows.\n")
    t0 = time.perf_counter()
    results = {kind: run_recall(bases, kind, cfg) for kind in EDITS}
    fp, clean, flags = false_flags(bases, cfg)
    rows = [quality_row(k, v["planted"], v["found"], None, None) for k, v in results.items()]
    rows.append(["(none: distinct prompts)", 0, 0, "-", ff(fp, clean)])
    all_texts, _ = distinct_prompts(items, openings=False)
    fp_t, clean_t, flags_t = false_flags(all_texts, cfg)
    rows.append(["(none: distinct texts, HH continuations included)", 0, 0, "-", ff(fp_t, clean_t)])
    print(md_table(QUALITY_HEADERS, rows))
    # of the latter, how many are flagged against a continuation of the same conversation (same opening turn)
    jt = frame_of([m for _, m in all_texts])
    row_of_hash = {h: _row_of(p) for h, p in jt.select("prompt_hash", "pair_id").iter_rows()}
    opening = [re.sub(r"\W+", " ", next((x["content"] for x in m if x["role"] == "user"), "").lower()).strip()
               for _, m in all_texts]
    cont = sum(opening[row_of_hash[ha]] == opening[row_of_hash[hb]]
               for ha, hb in (re.findall(r"prompt ([0-9a-f]{16})", d)[:2] for d in flags_t["detail"].to_list()))
    print(f"\nOf the {fp_t} flagged distinct texts, {cont} are flagged against a continuation of the same "
          f"conversation (same opening user turn: real near duplicates), {fp_t - cont} against another prompt.")
    skipped = {k: v["skipped"] for k, v in results.items() if v["skipped"]}
    print(f"\nCopies identical to their original after normalisation are not counted (not a near duplicate: "
          f"the same prompt_hash): {skipped}.  Found = flagged near_duplicate and in the original's cluster.  "
          f"({time.perf_counter() - t0:.1f} s)")
    if fp:
        j = frame_of([m for _, m in bases])
        txt = dict(j.select("prompt_hash", "prompt_text").iter_rows())
        print("\nFlagged distinct prompts (each pair of neighbours once):\n")
        shown: set[frozenset] = set()
        for d in flags["detail"].to_list():
            ha, hb = re.findall(r"prompt ([0-9a-f]{16})", d)[:2]
            if frozenset((ha, hb)) in shown:
                continue
            shown.add(frozenset((ha, hb)))
            jac = re.search(r"Jaccard ([0-9.]+)", d).group(1)
            print(f"- {jac}: \"{txt[ha][:90]}\" ~ \"{txt[hb][:90]}\"")
    section("near_duplicates: recall by prompt length (words; a CJK word = 2 characters)")
    bucket_names = [_bucket(lo) for lo, _ in BUCKETS]
    brow = []
    for k in WORD_EDITS:
        bb = results[k]["by_bucket"]
        brow.append([k] + [f"{bb[n][0]}/{bb[n][1]}" if n in bb else "-" for n in bucket_names])
    print(md_table(["edit", *bucket_names], brow))

    section(f"near_duplicates: S-curve for {b} bands x {r} rows (num_perm {cfg.num_perm}, threshold {cfg.threshold})")
    print(md_table(["Jaccard", "P(candidate) = 1-(1-J^r)^b", "P(estimate >= threshold)", "P(flag) (Monte Carlo, 20k)"],
                   s_curve(cfg, np.random.default_rng(0))))
    print("\nMeasured on real prompts (5-60 words) against copies with 1-15 random word edits (true Jaccard of the "
          "word sets):\n")
    print(md_table(["true Jaccard", "pairs", "flagged share"], empirical_s_curve(bases, cfg)))
    section("near_duplicates: a child version reuses the parent's index")
    index_reuse(bases, cfg)
    if not sweep:
        return
    section("near_duplicates: estimated Jaccard of one-word edits vs distinct prompts (default hashing)")
    rows, thr = jaccard_sweep(bases, cfg)
    print(md_table(["", "n", *[f">= {t}" for t in thr]], rows))
    section("near_duplicates: other parameters (recall per edit class, false flags on distinct prompts)")
    variants = [("default (shingle 1, 128 perm, 0.7)", cfg),
                ("shingle_size 2", NearDuplicateConfig(shingle_size=2)),
                ("shingle_size 3", NearDuplicateConfig(shingle_size=3)),
                ("num_perm 64", NearDuplicateConfig(num_perm=64)),
                ("num_perm 256", NearDuplicateConfig(num_perm=256)),
                ("threshold 0.6", NearDuplicateConfig(threshold=0.6)),
                ("threshold 0.8", NearDuplicateConfig(threshold=0.8))]
    vrows = []
    for name, c in variants:
        rec = results if c == cfg else {k: run_recall(bases, k, c) for k in WORD_EDITS}
        fp_v, clean_v, _ = (fp, clean, None) if c == cfg else false_flags(bases, c)
        vrows.append([name] + [pct(rec[k]["found"], rec[k]["planted"]) for k in WORD_EDITS] + [ff(fp_v, clean_v)])
    print(md_table(["config", *WORD_EDITS, "false flags"], vrows))


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


# ---------------------------------------------------------------- language
FRENCH = [
    "Bonjour, je voudrais savoir comment annuler ma commande avant qu'elle ne soit expédiée.",
    "Vous pouvez modifier votre réservation en ligne depuis votre espace client, sans frais supplémentaires.",
    "Il est important de bien lire les conditions avant de signer le contrat de location.",
    "Nous avons bien reçu votre message et nous vous répondrons dans les plus brefs délais.",
    "Pour réinitialiser votre mot de passe, cliquez sur le lien envoyé à votre adresse électronique.",
    "La recette est simple : mélangez la farine, les œufs et le lait, puis laissez reposer la pâte une heure.",
    "Je ne suis pas sûr que ce soit une bonne idée, mais nous pouvons en parler demain matin.",
    "Les enfants doivent être accompagnés d'un adulte pendant toute la durée de la visite.",
    "Cette méthode fonctionne mieux si vous divisez le problème en plusieurs petites étapes.",
    "Le train pour Lyon part à huit heures et il arrive vers midi, si tout se passe bien.",
    "Il faut arroser les plantes deux fois par semaine et les garder à l'abri du soleil direct.",
    "Merci pour votre patience ; le remboursement apparaîtra sur votre compte sous cinq jours ouvrés.",
    "Vous trouverez ci-dessous une liste des documents que vous devez apporter au rendez-vous.",
    "Elle a expliqué que le projet serait terminé avant la fin du mois, malgré quelques retards.",
    "Si le problème persiste, redémarrez l'appareil et vérifiez que le câble est bien branché.",
    "Nous vous conseillons de comparer plusieurs offres avant de choisir votre fournisseur d'énergie.",
    "Le musée est ouvert tous les jours sauf le lundi, de dix heures à dix-huit heures.",
    "Pour apprendre une langue, il vaut mieux pratiquer un peu chaque jour que beaucoup une fois par mois.",
    "Votre colis a été remis au transporteur et sera livré à l'adresse indiquée lors de la commande.",
    "Je pense que cette solution est la plus simple, mais elle demande un peu plus de temps.",
]
SHORT_AND_CODE = [  # (locale, prompt, reply): short answers, code, numbers, names -- never evidence of a mismatch
    ("ja-JP", "東京都の人口はどのくらいですか？", "約1400万人です。"),
    ("ja-JP", "Pythonでリストを逆順にするには？", "```python\nxs = [1, 2, 3]\nxs.reverse()\nprint(xs[::-1])\n```"),
    ("ja-JP", "このエラーの原因は何ですか？", "`ModuleNotFoundError: No module named 'requests'` -> `pip install requests`"),
    ("ja-JP", "おすすめのエディタは？", "VS Code"),
    ("ja-JP", "設定ファイルの例を見せてください。", "{\"host\": \"localhost\", \"port\": 8080, \"debug\": true, \"workers\": 4}"),
    ("ja-JP", "会議は何時からですか？", "10:30〜"),
    ("zh", "如何在Linux上查看磁盘使用情况？", "df -h && du -sh /var/log/*"),
    ("zh", "1加1等于几？", "2"),
    ("zh", "给我一个SQL查询的例子。", "SELECT id, name FROM users WHERE created_at >= '2024-01-01' ORDER BY id;"),
    ("zh", "推荐一个前端框架。", "React"),
    ("zh", "用JavaScript写一个求和函数。", "```js\nconst sum = (xs) => xs.reduce((a, b) => a + b, 0);\nconsole.log(sum([1, 2, 3]));\n```"),
    ("zh-CN", "公司的邮箱地址是什么？", "support@example.com"),
    ("en", "What is 17 * 23?", "391"),
    ("en", "How do I list files in a directory in Python?", "```python\nimport os\nfor name in sorted(os.listdir('.')):\n    print(name)\n```"),
    ("en", "Say thank you in Japanese.", "ありがとう"),
    ("en", "What's the Chinese word for 'water'?", "水 (shuǐ)"),
    ("en", "Give me a regex for an ISO date.", "^\\d{4}-\\d{2}-\\d{2}$"),
    ("en", "Name a famous French cheese.", "Camembert de Normandie"),
    ("en", "Fix this: x = [1, 2, 3; print(x)", "x = [1, 2, 3]\nprint(x)"),
    ("en", "Reply with OK.", "OK"),
]


def _pair(i: int, locale: str, prompt, a: str, b: str, tag: str) -> dict:
    return {"comparison_id": f"{tag}-{i:05d}", "pair_id": f"{tag}-{i:05d}", "prompt": prompt, "response_a": a,
            "response_b": b, "label": "a", "annotator_id": "rev-1", "annotator_kind": "human", "locale": locale}


def _flagged_pairs(records: list[dict], cfg: LanguageConfig) -> set[str]:
    if not records:
        return set()
    res = language.run(judgments_from_records(records), cfg)
    return set(res.flags["subject_id"].to_list())


def language_sets(seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, list[dict]], list[dict]]:
    """(clean record sets, planted record sets, the real rows in order) -- built once, seeded."""
    rng = random.Random(seed)
    items = real_items()
    shared_rows = [it for it in items if it["source"].startswith("shared/")] or \
        [it for it in items if it["source"] != "source/ja_handwritten"]
    ja = [it for it in items if it["source"] == "source/ja_handwritten"]
    ok = lambda it: normalize_text(it["a"]) and normalize_text(it["b"])  # noqa: E731 - 4 HH rows have an empty reply
    shared_rows = [it for it in shared_rows if ok(it)]
    en_rows = [it for it in shared_rows if it["locale"] == "en"]
    zh_rows = [it for it in shared_rows if it["locale"] == "zh"]
    ja_clean = [it for it in ja if it["id"] != "ja-031"]

    def recs(rows: list[dict], tag: str, locale: str | None = None, b=None) -> list[dict]:
        return [_pair(i, locale or it["locale"], it["prompt"], it["a"], b() if b else it["b"], tag) for i, it in enumerate(rows)]

    clean = {
        "(clean) HH-RLHF harmless (en)": recs([it for it in en_rows if "hh" in it["source"]], "hh"),
        "(clean) LLaMA-Factory DPO en (en)": recs([it for it in en_rows if "llamafactory" in it["source"]], "lfen"),
        "(clean) LLaMA-Factory DPO zh (zh)": recs(zh_rows, "lfzh"),
        "(clean) ja_handwritten (ja-JP), 30 clean rows": recs(ja_clean, "ja"),
        "(clean) short / code-only replies": [_pair(i, loc, p, a, "—", "short") for i, (loc, p, a) in enumerate(SHORT_AND_CODE)],
    }
    # planted: a real reply of another language as response_b (replies of >= 60 characters: a sentence or more)
    long_enough = lambda t: len(normalize_text(t)) >= 60  # noqa: E731
    en_replies = [it["a"] for it in en_rows if long_enough(it["a"])]
    zh_replies = [it["a"] for it in zh_rows if long_enough(it["a"])]
    ja_replies = [it[k] for it in ja_clean for k in ("a", "b") if long_enough(it[k])]
    ja_hosts = ja_clean * 10  # 30 prompts, each with 10 different foreign replies
    pick = lambda pool: lambda: rng.choice(pool)  # noqa: E731
    planted = {
        "English reply under ja-JP (ja-031, real)": recs([it for it in ja if it["id"] == "ja-031"], "ja31"),
        "English reply under ja-JP": recs(rng.sample(ja_hosts, 300), "en-ja", b=pick(en_replies)),
        "English reply under zh": recs(rng.sample(zh_rows, 300), "en-zh", b=pick(en_replies)),
        "Chinese reply under en": recs(rng.sample(en_rows, 300), "zh-en", b=pick(zh_replies)),
        "Japanese reply under en": recs(rng.sample(en_rows, 300), "ja-en", b=pick(ja_replies)),
        "Chinese reply under ja-JP": recs(rng.sample(ja_hosts, 300), "zh-ja", b=pick(zh_replies)),
        "Japanese reply under zh": recs(rng.sample(zh_rows, 300), "ja-zh", b=pick(ja_replies)),
    }
    hosts = rng.sample(en_rows, 200)
    planted["French paragraph (2-4 sentences) under en"] = recs(hosts, "fr", b=lambda: " ".join(rng.sample(FRENCH, rng.randint(2, 4))))
    planted["one French sentence under en"] = recs(hosts, "fr1", b=pick(FRENCH))
    sample_en, sample_zh = rng.sample(en_rows, 150), rng.sample(zh_rows, 150)
    planted["English pair labelled zh-CN"] = recs(sample_en, "en-as-zh", "zh-CN")
    planted["Chinese pair labelled en"] = recs(sample_zh, "zh-as-en", "en")
    planted["Chinese pair labelled ja-JP"] = recs(sample_zh, "zh-as-ja", "ja-JP")
    planted["English pair labelled fr-FR"] = recs(sample_en, "en-as-fr", "fr-FR")
    return clean, planted, shared_rows + ja


LATIN_VS_LATIN = ("French paragraph (2-4 sentences) under en", "one French sentence under en", "English pair labelled fr-FR")


def language_scores(clean: dict, planted: dict, cfg: LanguageConfig) -> dict[str, tuple[int, int]]:
    return {name: (len(_flagged_pairs(r, cfg)), len(r)) for name, r in {**clean, **planted}.items()}


def bench_language(sweep: bool) -> None:
    cfg = LanguageConfig()
    clean, planted, real_rows = language_sets()
    section("language: real rows with their locale, planted mismatches, short and code replies")
    t0 = time.perf_counter()
    sc = language_scores(clean, planted, cfg)
    rows_out = [[name, 0, 0, "-", ff(*sc[name])] for name in clean]
    rows_out += [[name, sc[name][1], sc[name][0], pct(*sc[name]), ""] for name in planted]
    print(md_table(QUALITY_HEADERS, rows_out))
    all_real = [_pair(i, it["locale"], it["prompt"], it["a"], it["b"], "real") for i, it in enumerate(real_rows)]
    res = language.run(judgments_from_records(all_real), cfg)
    m = res.metrics
    print(f"\nAll real rows in one run ({m['pairs_checked']} pairs, {m['distinct_texts']} distinct texts): detected "
          f"language per locale {m['matrix']}; decided by {m['decided_by']}; {m['langdetect_calls']} langdetect calls.  "
          "Flagged:\n")
    for sid, detail in res.flags.select("subject_id", "detail").iter_rows():
        print(f"- {real_rows[int(sid.split('-')[1])]['id']}: {detail}")
    real_clean = [sc[n] for n in clean if "short" not in n]
    print(f"\nClean real rows: {ff(sum(f for f, _ in real_clean), sum(n for _, n in real_clean))} flagged.  Planted "
          f"replies are real replies of at least 60 characters from the other files (French: {len(FRENCH)} hand-written "
          f"sentences, combined).  ({time.perf_counter() - t0:.1f} s)")
    if not sweep:
        return
    section("language: gates and thresholds (false flags on clean rows; recall pooled over the planted classes "
            "other than Latin-vs-Latin)")
    variants = [("default", cfg)] + [
        (f"{k} {v}", LanguageConfig(**{k: v})) for k, vals in (
            ("min_chars", (20, 80)), ("min_cjk_chars", (6, 24)), ("max_code_share", (0.05, 0.3)),
            ("min_probability", (0.8, 0.99)), ("min_words", (4, 16)), ("profile_chars", (200, 1000)))
        for v in vals]
    vrows = []
    for name, c in variants:
        s2 = sc if c == cfg else language_scores(clean, planted, c)
        real_f = sum(s2[n][0] for n in clean if "short" not in n)
        real_n = sum(s2[n][1] for n in clean if "short" not in n)
        pl_f = sum(s2[n][0] for n in planted if n not in LATIN_VS_LATIN)
        pl_n = sum(s2[n][1] for n in planted if n not in LATIN_VS_LATIN)
        vrows.append([name, ff(real_f, real_n), ff(*s2["(clean) short / code-only replies"]), f"{pl_f}/{pl_n} = {pl_f / pl_n:.3f}"])
    print(md_table(["config", "false flags, real rows", "false flags, short / code", "recall (planted)"], vrows))


# ---------------------------------------------------------------- duplicates (synth)
def _flip(x):
    return {"a": "b", "b": "a"}.get(x, x)


def bench_duplicates(seeds: list[int]) -> None:
    from tests.synth import make_planted

    section(f"duplicates: planted into tests/synth.py batches (seeds {', '.join(map(str, seeds))})")
    tally = {k: [0, 0, 0, 0] for k in ("exact_duplicate", "identical_responses")}
    controls = {k: [0, 0] for k in ("re-judged in the other display order", "same pair, other verdict",
                                    "same judgment, other annotator", "responses differ by one character")}
    t0 = time.perf_counter()
    for seed in seeds:
        pt = make_planted(seed)
        rng = random.Random(seed)
        recs = [dict(r) for r in pt.records]
        n0 = len(recs)
        extra: list[dict] = []
        expect_dup: set[str] = set()
        control_ids: dict[str, set[str]] = {k: set() for k in controls}
        decisive = [r for r in recs if r["label"] in ("a", "b") and r.get("shown_first")]
        for k, r in enumerate(rng.sample(decisive, 120)):
            new = dict(r, comparison_id=f"{r['comparison_id']}-redelivered", batch_id="redelivery")
            if k % 2:  # the vendor swapped the a/b names: still the same judgment
                new.update(response_a=r["response_b"], response_b=r["response_a"], label=_flip(r["label"]),
                           shown_first=_flip(r["shown_first"]))
                if "gold_label" in r:
                    new["gold_label"] = _flip(r["gold_label"])
            if k % 4 >= 2:  # re-exported with padding and CRLF: the same texts after normalisation
                for f in ("prompt", "response_a", "response_b"):
                    new[f] = " \r\n" + new[f] + "  \r\n"
            extra.append(new)
            expect_dup.add(new["comparison_id"])
        used = {r["comparison_id"] for r in extra}
        # controls are made from judgments that are their annotator's only one of the pair (an AI
        # judge's second judgment in the other order would make a control a real duplicate)
        unit = lambda r: (r["annotator_id"], r["prompt"], *sorted((r["response_a"], r["response_b"])))  # noqa: E731
        n_unit = _count(unit(r) for r in recs)
        pool = [r for r in decisive if r["comparison_id"] + "-redelivered" not in used and n_unit[unit(r)] == 1]
        for k, r in enumerate(rng.sample(pool, 120)):
            cid = f"{r['comparison_id']}-ctl{k}"
            if k % 3 == 0:
                new, name = dict(r, shown_first=_flip(r["shown_first"])), "re-judged in the other display order"
            elif k % 3 == 1:
                new, name = dict(r, label=_flip(r["label"])), "same pair, other verdict"
            else:
                new, name = dict(r, annotator_id="h-control"), "same judgment, other annotator"
            new["comparison_id"] = cid
            extra.append(new)
            control_ids[name].add(cid)
        # identical responses: new pairs whose b is a's text, or a's text with case / whitespace changed
        same_pairs: set[str] = set()
        near_pairs: set[str] = set()
        texts = [r["response_a"] for r in recs]
        for k in range(60):
            a = rng.choice(texts)
            variant = [a, a.upper(), "  " + a.replace(" ", "   ") + "\n", a.replace(" ", "\n")][k % 4]
            for m in range(2):
                extra.append({"comparison_id": f"s{seed}-same{k}-{m}", "pair_id": f"s{seed}-same{k}",
                              "prompt": f"identical responses case {seed}-{k}", "response_a": a, "response_b": variant,
                              "label": "tie", "annotator_id": f"h{m:02d}", "annotator_kind": "human"})
            same_pairs.add(f"s{seed}-same{k}")
            b = a[:-1] + ("!" if a[-1] != "!" else "?")
            extra.append({"comparison_id": f"s{seed}-near{k}", "pair_id": f"s{seed}-near{k}",
                          "prompt": f"near identical case {seed}-{k}", "response_a": a, "response_b": b,
                          "label": "a", "annotator_id": "h00", "annotator_kind": "human"})
            near_pairs.add(f"s{seed}-near{k}")
        j = judgments_from_records(recs + extra)
        res = duplicates.run(j)
        fl = res.flags
        got_j = set(fl.filter(pl.col("reason") == "exact_duplicate")["subject_id"].to_list())
        got_p = set(fl.filter(pl.col("reason") == "identical_responses")["subject_id"].to_list())
        clean_j = {r["comparison_id"] for r in recs} | set().union(*control_ids.values())
        t = tally["exact_duplicate"]
        t[0] += len(expect_dup & got_j)
        t[1] += len(expect_dup)
        t[2] += len(clean_j & got_j)
        t[3] += len(clean_j)
        clean_p = set(j["pair_id"].unique().to_list()) - same_pairs
        t = tally["identical_responses"]
        t[0] += len(same_pairs & got_p)
        t[1] += len(same_pairs)
        t[2] += len(clean_p & got_p)
        t[3] += len(clean_p)
        for name, ids in control_ids.items():
            controls[name][0] += len(ids & got_j)
            controls[name][1] += len(ids)
        controls["responses differ by one character"][0] += len(near_pairs & got_p)
        controls["responses differ by one character"][1] += len(near_pairs)
        assert n0 == len(pt.records)
    rows = [quality_row(k, v[1], v[0], v[2], v[3]) for k, v in tally.items()]
    print(md_table(QUALITY_HEADERS, rows))
    print("\nNear-miss controls (included in the clean subjects above; none may be flagged):\n")
    print(md_table(["control", "flagged / planted"], [[k, f"{v[0]}/{v[1]}"] for k, v in controls.items()]))
    # real data: the LLaMA-Factory files hold exact duplicate rows (5 en, 11 zh, per ../shared/data/README.md)
    if SHARED.exists():
        from pipeline.ingest import ingest_files

        jr = ingest_files(sorted(SHARED.glob("*.jsonl"))).judgments
        r = duplicates.run(jr)
        print(f"\nReal data (`../shared/data`, {jr.height} valid judgments): {r.metrics['exact_duplicates']} exact "
              f"duplicates flagged (the README lists 5 + 11 duplicate rows), {r.metrics['identical_responses']} "
              f"identical-response pairs.")
    print(f"({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------- statistical checks (synth)
def bench_stats(seeds: list[int]) -> None:
    from pipeline.aggregate import aggregate, annotator_table
    from pipeline.checks import agreement, length_bias, position_bias, reliability, routing
    from tests.synth import make_planted

    section(f"statistical checks: tests/synth.py batches (seeds {', '.join(map(str, seeds))}), default policy")
    cfg = ChecksConfig(agreement={"bootstrap": 0})
    kind_of = {"low_agreement": "pair", "too_easy": "pair", "label_imbalance": "slice"}
    tally: dict[str, list[int]] = {}
    insufficient = [0, 0, 0]  # annotators with few judgments, of them insufficient_data, of them flagged
    t0 = time.perf_counter()
    for seed in seeds:
        pt = make_planted(seed)
        j = pt.judgments()
        agg = aggregate(j, cfg.aggregation)
        results = [agreement.run(j, cfg, pairs=agg.pairs), reliability.run(j, cfg, ds_accuracy=agg.annotators),
                   position_bias.run(j, cfg, pairs=agg.pairs), length_bias.run(j, cfg, pairs=agg.pairs),
                   routing.run(j, cfg, pairs=agg.pairs)]
        flags = pl.concat([r.flags for r in results])
        table = annotator_table(results, agg.annotators)
        for reason, planted in pt.truth.items():
            got = set(flags.filter(pl.col("reason") == reason)["subject_id"].to_list())
            clean = {"pair": pt.clean_pairs, "slice": pt.clean_slices}.get(kind_of.get(reason, ""), pt.clean_annotators)
            t = tally.setdefault(reason, [0, 0, 0, 0])
            t[0] += len(planted & got)
            t[1] += len(planted)
            t[2] += len(clean & got)
            t[3] += len(clean)
        status = dict(table.select("annotator_id", "status").iter_rows())
        ann_flagged = set(flags.filter(pl.col("subject_kind") == "annotator")["subject_id"].to_list())
        for a in pt.insufficient:
            insufficient[0] += 1
            insufficient[1] += status.get(a) == "insufficient_data"
            insufficient[2] += a in ann_flagged
    rows = [quality_row(f"{k} ({kind_of.get(k, 'annotator')})", v[1], v[0], v[2], v[3]) for k, v in sorted(tally.items())]
    print(md_table(QUALITY_HEADERS, rows))
    print(f"\nAnnotators with 3-12 judgments: {insufficient[1]}/{insufficient[0]} insufficient_data, "
          f"{insufficient[2]} flagged.  ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=["near_duplicates", "language", "duplicates", "stats", "consensus"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3], help="synth seeds (duplicates, stats)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the parameter sweeps (near duplicates, language)")
    a = ap.parse_args()
    todo = a.only or ["near_duplicates", "language", "duplicates", "stats", "consensus"]
    print(f"`.venv/bin/python benchmarks/quality.py` — real data: data/source/"
          f"{' + ../shared/data/' if SHARED.exists() else ' (../shared/data not found)'}")
    if "near_duplicates" in todo:
        bench_near_duplicates(sweep=not a.no_sweep)
    if "language" in todo:
        bench_language(sweep=not a.no_sweep)
    if "duplicates" in todo:
        bench_duplicates(a.seeds)
    if "stats" in todo:
        bench_stats(a.seeds)
    if "consensus" in todo:  # benchmarks/consensus_quality.py: needs crowd-kit (requirements-bench.txt)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from consensus_quality import bench_consensus

        section("consensus accuracy on judge panels with known answers (benchmarks/consensus_quality.py, seeds 100-109)")
        print(bench_consensus(list(range(100, 110))))


if __name__ == "__main__":
    main()
