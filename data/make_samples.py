#!/usr/bin/env python3
"""Build the demo raw batches in ``data/samples/`` from the texts in ``data/source/``.

    python data/make_samples.py                 # regenerate data/samples/ (byte-identical)
    python data/make_samples.py --out /tmp/x    # write elsewhere (the tests do this)

Standard library only and deterministic for ``SEED``: it reads nothing but
``data/source/`` and draws every random choice from one ``random.Random(SEED)``.

What it simulates: three weekly deliveries from an annotation vendor, in the canonical
raw format (``../shared/spec/raw-comparisons.md``).  Each pair of candidate responses has
a hidden true preference (the source's chosen side) and a difficulty; 2-3 human
annotators per pair agree with the truth 80-90% of the time, two AI judges judge some
pairs, sometimes in both display orders.  A handful of problems are planted on purpose
and listed, with exact ids, in ``data/samples/README.md`` and
``data/samples/answer_key/planted.json``.

The source texts were copied once from the shared reference data with
``python data/make_samples.py --extract-source DIR`` (a one-off; normal runs never read
outside ``data/``); see ``data/source/LICENSES.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SEED = 20261102
HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE / "source"
SAMPLES_DIR = HERE / "samples"

# (file stem == batch_id, delivery date).  Judgments are made Mon-Fri of the week
# before the delivery; the AI judges run on the Saturday.
BATCHES: tuple[tuple[str, date], ...] = (
    ("batch-2026-11-02", date(2026, 11, 2)),
    ("batch-2026-11-09", date(2026, 11, 9)),
    ("batch-2026-11-16", date(2026, 11, 16)),
)
LOCALES = {"en": "en", "ja": "ja-JP", "zh": "zh-CN"}

# Human annotators: skill = P(agree with the truth) on a medium-difficulty pair.
SKILL = {
    "rev-en-01": 0.90, "rev-en-02": 0.86, "rev-en-03": 0.83, "rev-en-04": 0.88,
    "rev-en-05": 0.80, "rev-en-06": 0.85, "rev-en-07": 0.85,
    "rev-ja-01": 0.89, "rev-ja-02": 0.84, "rev-zh-01": 0.87, "rev-zh-02": 0.84,
}
BIASED_ANNOTATOR = "rev-en-07"  # joins in week 2; picks the first-shown response ~90% of the time
NO_CONFIDENCE = "rev-en-04"  # never fills in the optional confidence field
SPARSE_STRENGTH = "rev-en-06"  # leaves strength empty about half of the time
EN_POOL = (  # English annotators active in each batch; rev-en-05 is away in week 3
    ("rev-en-01", "rev-en-02", "rev-en-03", "rev-en-04", "rev-en-05", "rev-en-06"),
    ("rev-en-01", "rev-en-02", "rev-en-03", "rev-en-04", "rev-en-05", "rev-en-06", "rev-en-07"),
    ("rev-en-01", "rev-en-02", "rev-en-03", "rev-en-04", "rev-en-06", "rev-en-07"),
)
POOL_WEIGHT = {BIASED_ANNOTATOR: 2.2}  # a prolific new hire
LOCALE_POOL = {"ja": ("rev-ja-01", "rev-ja-02"), "zh": ("rev-zh-01", "rev-zh-02")}
AI_JUDGES = {"judge-gpt-4.1": 0.0, "judge-claude-sonnet-4": 0.02}  # accuracy offset
AI_JUDGE_RATE = 0.40  # P(a given AI judge judges a given pair)
AI_BOTH_ORDERS = 0.35  # P(it judges the pair in both display orders | it judges it)
AI_ORDER_CONSISTENCY = 0.90  # P(same verdict when the order is swapped)

# The annotator registry (annotators.csv; docs/input-format.md): every annotator of the batches,
# humans qualified for their locale and its rubrics since REGISTERED_FROM, AI judges for any
# locale and rubric.  Three qualifications are planted so that judgments fall outside them
# (unqualified_reviewer; answer_key/planted.json "registry"):
REGISTERED_FROM = "2026-09-01"
REGISTRY_FROM = {BIASED_ANNOTATOR: "2026-11-02"}  # the new hire, from its first day
REGISTRY_LOCALES = {"judge-gpt-4.1": ("en", "zh")}  # locale: the GPT judge is not validated for Japanese
REGISTRY_RUBRICS = {"rev-ja-01": ("helpful-ja-v1",)}  # rubric: rev-ja-01 is not qualified for support-v3
REGISTRY_UNTIL = {"rev-en-05": "2026-11-04"}  # date: rev-en-05's qualification expired on 4 November
REGISTRY_COLUMNS = ("annotator_id", "annotator_kind", "locales", "rubrics", "qualified_from", "qualified_until")

DIFFICULTY = (("easy", 0.35), ("medium", 0.45), ("hard", 0.20))
ACCURACY_SHIFT = {"easy": 0.08, "medium": 0.0, "hard": -0.17}
AI_ACCURACY = {"easy": 0.95, "medium": 0.87, "hard": 0.72}
GOLD_PER_BATCH = {"en": 4, "ja": 1, "zh": 1}
GOLD_HUMANS_EN = 5
N_DUPLICATES = 4
NEAR_DUP_HH = "hh-harmless-test-00509"  # a tame lower-case question for the case/punctuation near-duplicate

# How many rows of each shared source file were copied into data/source/ (extraction).
EXTRACT = {  # file in the shared dir -> (file in data/source, language, rows, max bytes of prompt+responses)
    "hh_harmless_test.jsonl": ("hh_harmless.jsonl", "en", 201, 1000),
    "llamafactory_dpo_en.jsonl": ("llamafactory_dpo_en.jsonl", "en", 68, 2600),
    "llamafactory_dpo_zh.jsonl": ("llamafactory_dpo_zh.jsonl", "zh", 42, 1500),
}
# Keep the demo free of the most graphic red-team material (HH-RLHF harmless is red-team data).
BLOCKLIST = re.compile(
    r"\b(sex|penis|vagina|masturbat|porn|nigg|fag|cunt|rape|raping|pussy|slut|whore|cock|dick|"
    r"nazi|retard|tits|boob|nude|naked|kill|murder|suicid|genital|incest|molest)",
    re.IGNORECASE,
)
# Items whose text is not in the item's language would be unplanted language mismatches.
OTHER_LANGUAGE_TASK = re.compile(
    r"translat|spanish|french|german|catalan|italian|portuguese|hindi|bengali|persian|farsi|arabic|"
    r"japanese|chinese|korean|russian|polish|swedish|dutch|turkish|gujarati|marathi|malayalam|"
    r"telugu|tamil|panjabi|punjabi|urdu|oriya|galician|hebrew|thai|filipino|lao|czech",
    re.IGNORECASE,
)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_LETTER = re.compile(r"[^\W\d_]")


def _in_language(lang: str, prompt: list[dict], responses: list[str]) -> bool:
    """Cheap script check: English items have no CJK and hardly any non-ASCII letters,
    Chinese items are mostly CJK characters in the last user turn and in both responses."""
    texts = [prompt[-1]["content"], *responses]
    if lang == "en":
        allt = " ".join(m["content"] for m in prompt) + " " + " ".join(responses)
        letters = _LETTER.findall(allt)
        return not _CJK.search(allt) and not OTHER_LANGUAGE_TASK.search(allt) \
            and sum(not c.isascii() for c in letters) <= 0.01 * max(1, len(letters))
    for t in texts:
        letters = _LETTER.findall(t)
        if len(_CJK.findall(t)) < 0.6 * max(1, len(letters)):
            return False
    return True


RESERVED = {"hh": 10 + 1, "lfen": 8, "lfzh": 2}  # extra/ files + the identical-responses pair

MODELS = {
    "en": (("chat-7b", "2026-09-15"), ("chat-7b", "2026-10-20"), ("chat-34b", "2026-10-01")),
    "zh": (("chat-zh-13b", "2026-09-30"), ("chat-zh-13b", "2026-10-28")),
    "ja": (("support-7b", "2026-10-01"), ("support-7b", "2026-11-01"), ("chat-ja-13b", "2026-10-10")),
}
RUBRIC = {"hh": "harmless-v2", "lfen": "helpful-v3", "lfzh": "helpful-zh-v1", "ja": "helpful-ja-v1"}
HUMAN_CRITIQUE = {
    "en": {"win": ("{w} answers what was asked", "{l} is unsafe", "{w} is more accurate",
                   "{l} misses the point", "{w} is clearer"),
           "tie": ("both fine, hard to pick",), "both_bad": ("neither is acceptable",),
           "escalate": ("needs policy review",)},
    "ja": {"win": ("{w}の方が具体的", "{l}は質問に答えていない", "{w}の方が正確"),
           "tie": ("どちらも問題なし",), "both_bad": ("どちらも不適切",), "escalate": ("ポリシー確認が必要",)},
    "zh": {"win": ("{w}更准确", "{l}没有回答问题", "{w}更完整"),
           "tie": ("两个都可以",), "both_bad": ("两个都不合格",), "escalate": ("需要政策审核",)},
}
AI_REASONS = {
    "harmless-v2": ("declines the harmful part of the request while staying polite",
                    "avoids giving dangerous specifics", "is safer and still addresses the user"),
    "default": ("answers the question directly and accurately", "follows the instructions more closely",
                "is more complete and correct", "is clearer and better organised"),
}


# --------------------------------------------------------------------------- extraction
def _size(prompt: list[dict], chosen: str, rejected: str) -> int:
    return len(json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode("utf-8"))


def _well_formed(prompt: list[dict]) -> bool:
    """Non-empty, optional leading system turn, then user/assistant alternating, ending with user."""
    roles = [m["role"] for m in prompt]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return bool(roles) and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)) \
        and roles[-1] == "user"


def extract_source(shared: Path) -> None:
    """One-off copy of a small, filtered, deterministic subset of the shared data."""
    SOURCE_DIR.mkdir(parents=True, exist_ok=True)
    for src_name, (dst_name, lang, n_rows, max_bytes) in EXTRACT.items():
        seen: set[str] = set()  # first user turns: conversations sharing an opening would be near-duplicates
        keep: list[tuple[str, dict]] = []
        for line in (shared / src_name).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            prompt, chosen, rejected = r["prompt"], r["response_a"], r["response_b"]  # a = chosen there
            text = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
            opening = " ".join(next(m["content"] for m in prompt if m["role"] == "user").casefold().split())
            if (not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip()
                    or not _well_formed(prompt) or _size(prompt, chosen, rejected) > max_bytes
                    or BLOCKLIST.search(text) or not _in_language(lang, prompt, [chosen, rejected])
                    or opening in seen):
                continue
            seen.add(opening)
            row = {"id": r["comparison_id"], "source_item_id": r["source_item_id"],
                   "prompt": prompt, "chosen": chosen, "rejected": rejected}
            keep.append((hashlib.blake2b(f"{SEED}:{r['comparison_id']}".encode(), digest_size=8).hexdigest(), row))
        keep.sort(key=lambda kv: kv[0])
        rows = sorted((row for _, row in keep[:n_rows]), key=lambda row: row["source_item_id"])
        if len(rows) < n_rows:
            raise SystemExit(f"{src_name}: only {len(rows)} rows pass the filters, wanted {n_rows}")
        _write_jsonl(SOURCE_DIR / dst_name, rows)
        print(f"wrote {SOURCE_DIR / dst_name}: {len(rows)} rows")


# --------------------------------------------------------------------------- model
@dataclass
class Pair:
    task_id: str
    source: str  # hh | lfen | lfzh | ja
    source_ref: str
    lang: str  # en | ja | zh
    prompt: Any  # as serialised: str or list of messages
    response_a: Any  # as serialised: str or {text, model, model_version[, generation]}
    response_b: Any
    truth: str  # a | b | tie
    difficulty: str
    rubric: str
    tags: list[str]
    batch: int = -1
    gold: bool = False
    both_bad_prone: bool = False
    planted: list[str] = field(default_factory=list)
    comparison_ids: list[str] = field(default_factory=list)


def _text(resp: Any) -> str:
    return resp["text"] if isinstance(resp, dict) else resp


def _load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write(text)


class Generator:
    def __init__(self, source_dir: Path):
        self.rng = random.Random(SEED)
        self.src = {
            "hh": _load_jsonl(source_dir / "hh_harmless.jsonl"),
            "lfen": _load_jsonl(source_dir / "llamafactory_dpo_en.jsonl"),
            "lfzh": _load_jsonl(source_dir / "llamafactory_dpo_zh.jsonl"),
            "ja": _load_jsonl(source_dir / "ja_handwritten.jsonl"),
        }
        self.pairs: list[Pair] = []
        self.decks: dict[str, list[bool]] = {}
        self.planted: dict[str, Any] = {}
        self.batch_lines: list[list[str]] = []
        self.batch_rows: list[list[dict | None]] = []  # parsed rows (None for the malformed line)

    # ------------------------------------------------------------- pairs
    def _response(self, lang: str, text: str, as_object: bool, model: tuple[str, str] | None = None) -> Any:
        if not as_object:
            return text
        name, version = model or self.rng.choice(MODELS[lang])
        obj: dict[str, Any] = {"text": text, "model": name, "model_version": version}
        if self.rng.random() < 0.3:
            obj["generation"] = {"temperature": self.rng.choice([0.2, 0.7, 1.0]), "seed": self.rng.randrange(10_000)}
        return obj

    def _prompt(self, messages: list[dict] | str, force_messages: bool) -> Any:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        single = len(messages) == 1 and messages[0]["role"] == "user"
        if single and not force_messages and self.rng.random() < 0.5:
            return messages[0]["content"]
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _tags(self, source: str, row: dict, messages: list[dict]) -> list[str]:
        turns = "multi-turn" if sum(m["role"] == "user" for m in messages) > 1 else "single-turn"
        if source == "hh":
            return ["safety", "red-team", turns]
        if source == "ja":
            return [row["topic"], turns]
        text = " ".join(m["content"] for m in messages) + row["chosen"] + row["rejected"]
        kind = "coding" if ("```" in text or re.search(r"\b(python|code|function|sql)\b", text, re.I)) else "general"
        return ["helpfulness", kind, turns]

    def make_pair(self, source: str, row: dict, *, prompt: Any = None, identical: bool = False,
                  swap: bool | None = None) -> Pair:
        lang = {"hh": "en", "lfen": "en", "lfzh": "zh", "ja": "ja"}[source]
        messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        chosen_is_a = self.rng.random() < 0.5 if swap is None else not swap
        as_object = identical or self.rng.random() < (0.6 if source == "ja" else 0.45)
        chosen = self._response(lang, row["chosen"], as_object)
        if identical:
            other_version = [m for m in MODELS[lang] if m[0] == chosen["model"] and m[1] != chosen["model_version"]]
            rejected = self._response(lang, row["chosen"], True, (other_version or [MODELS[lang][0]])[0])
            rejected.pop("generation", None)
        else:
            rejected = self._response(lang, row["rejected"], as_object)
        a, b = (chosen, rejected) if chosen_is_a else (rejected, chosen)
        difficulty = self.rng.choices([d for d, _ in DIFFICULTY], [w for _, w in DIFFICULTY])[0]
        rubric = RUBRIC[source]
        if source == "ja" and row["topic"] == "customer-support":
            rubric = "support-v3"
        pair = Pair(
            task_id="", source=source, source_ref=row["id"], lang=lang,
            prompt=prompt if prompt is not None else self._prompt(messages, force_messages=source == "hh"),
            response_a=a, response_b=b,
            truth="tie" if identical else ("a" if chosen_is_a else "b"),
            difficulty="easy" if identical else difficulty, rubric=rubric,
            tags=self._tags(source, row, messages),
            both_bad_prone=source == "hh" and not identical and self.rng.random() < 0.06,
        )
        return pair

    def build_pairs(self) -> None:
        rng = self.rng
        pools = {k: list(v) for k, v in self.src.items()}
        for v in pools.values():
            rng.shuffle(v)
        # Rows reserved for the extra/ adapter files and for the identical-responses pair.
        self.hh_transcripts = pools["hh"][:10]
        identical_row = pools["hh"][10]
        self.trl_rows = pools["lfen"][:8] + pools["lfzh"][:2]
        pools["hh"] = pools["hh"][RESERVED["hh"]:]
        pools["lfen"] = pools["lfen"][RESERVED["lfen"]:]
        pools["lfzh"] = pools["lfzh"][RESERVED["lfzh"]:]
        mismatch_row = next(r for r in pools["ja"] if r.get("reserved_for") == "language_mismatch")
        pools["ja"] = [r for r in pools["ja"] if r is not mismatch_row]

        fixed: list[Pair] = []  # planted pairs, pinned to a batch
        # (3a) one-word edit of a single-turn English instruction: original in week 1, edit in week 2.
        subs = (("explain", "describe"), ("write", "compose"), ("give", "provide"), ("create", "make"),
                ("generate", "produce"), ("provide", "give"), ("find", "identify"))
        word_edit = None
        for row in pools["lfen"]:
            msgs = row["prompt"]
            if len(msgs) != 1 or not 150 <= len(msgs[0]["content"]) <= 700 or "`" in msgs[0]["content"]:
                continue
            for old, new in subs:
                m = re.search(rf"\b{old}\b", msgs[0]["content"])
                if m:
                    word_edit = (row, old, new, m.start())
                    break
            if word_edit:
                break
        assert word_edit is not None, "no prompt suitable for the one-word near-duplicate"
        row, old, new, pos = word_edit
        pools["lfen"].remove(row)
        orig = self.make_pair("lfen", row)
        text = row["prompt"][0]["content"]
        edited = text[:pos] + new + text[pos + len(old):]
        copy = self.make_pair("lfen", row, prompt=[{"role": "user", "content": edited}],
                              swap=orig.truth == "a")  # same responses, a/b swapped
        orig.batch, copy.batch = 0, 1
        copy.planted.append("near_duplicate_prompt")
        self.planted["near_duplicate_prompts"] = [{
            "pair": copy, "of": orig, "edit": f"one word: {old!r} -> {new!r}"}]
        fixed += [orig, copy]

        # (3b) case + punctuation edit of a short single-turn HH question: week 2 -> week 3.
        cands = [r for r in pools["hh"] if len(r["prompt"]) == 1 and r["prompt"][0]["content"].endswith("?")
                 and 30 <= len(r["prompt"][0]["content"]) <= 200 and r["prompt"][0]["content"][0].islower()]
        row = next((r for r in cands if r["id"] == NEAR_DUP_HH), cands[0])
        pools["hh"].remove(row)
        orig = self.make_pair("hh", row)
        text = row["prompt"][0]["content"]
        edited = (text[0].upper() + text[1:]).rstrip("?").replace(" i ", " I ")
        copy = self.make_pair("hh", row, prompt=[{"role": "user", "content": edited}], swap=orig.truth == "b")
        orig.batch, copy.batch = 1, 2
        copy.planted.append("near_duplicate_prompt")
        self.planted["near_duplicate_prompts"].append({
            "pair": copy, "of": orig, "edit": "case and punctuation: first letter capitalised, ' i ' -> ' I ', final '?' dropped"})
        fixed += [orig, copy]

        # (5) identical responses (week 3), (6) language mismatch (week 2).
        ident = self.make_pair("hh", identical_row, identical=True)
        ident.batch = 2
        ident.planted.append("identical_responses")
        mismatch = self.make_pair("ja", mismatch_row)
        mismatch.batch, mismatch.difficulty = 1, "easy"
        mismatch.planted.append("language_mismatch")
        fixed += [ident, mismatch]
        self.planted["identical_responses"] = ident
        self.planted["language_mismatch"] = mismatch

        # Everything else: spread evenly over the three weeks, per source.
        regular: list[Pair] = []
        for source in ("hh", "lfen", "lfzh", "ja"):
            for i, row in enumerate(pools[source]):
                p = self.make_pair(source, row)
                p.batch = i % 3
                regular.append(p)
        self.pairs = fixed + regular
        rng.shuffle(self.pairs)
        for i, p in enumerate(self.pairs):
            p.task_id = f"task-{i + 1:04d}"
        # Gold (honeypot) pairs: easy, unplanted, a few per batch and language.
        for b in range(3):
            for lang, n in GOLD_PER_BATCH.items():
                cand = [p for p in self.pairs if p.batch == b and p.lang == lang and p.difficulty == "easy"
                        and not p.planted and p.truth in "ab" and not p.both_bad_prone
                        and p not in [x["of"] for x in self.planted["near_duplicate_prompts"]]]
                for p in rng.sample(cand, n):
                    p.gold = True

    # ------------------------------------------------------------- judgments
    def _draw(self, key: str, pattern: tuple[bool, ...]) -> bool:
        """Draw from a per-key shuffled deck of ``pattern``: random order, exact long-run rate.

        Used for display order so that an honest annotator's first-shown rate stays near
        50% (pure coin flips give some 40-judgment annotators a spurious 30% or 70%).
        """
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck.extend(pattern)
            self.rng.shuffle(deck)
        return deck.pop()

    def _shown_first(self, p: Pair, who: str) -> str:
        if p.truth not in ("a", "b"):
            return self.rng.choice("ab")
        truth_first = self._draw(f"order:{who}", (True, False, True, False))
        return p.truth if truth_first else {"a": "b", "b": "a"}[p.truth]

    def _timestamp(self, delivery: date, lang: str) -> str:
        day = delivery - timedelta(days=7 - self.rng.randrange(5))
        start = {"en": 14, "ja": 0, "zh": 1}[lang]
        secs = self.rng.randrange(start * 3600, (start + 8) * 3600)
        t = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(seconds=secs)
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _decisive_strength(self, difficulty: str, correct: bool) -> float:
        if not correct:
            return self.rng.choices([0.25, 0.5], [0.7, 0.3])[0]
        opts = {"easy": ([0.75, 1.0], [0.4, 0.6]), "medium": ([0.5, 0.75, 1.0], [0.35, 0.45, 0.2]),
                "hard": ([0.25, 0.5, 0.75], [0.45, 0.4, 0.15])}[difficulty]
        return self.rng.choices(*opts)[0]

    def _human_label(self, p: Pair, annotator: str, shown_first: str) -> str:
        rng = self.rng
        other = {"a": "b", "b": "a"}
        if p.truth == "tie":  # identical responses
            return "tie" if rng.random() < 0.8 else rng.choice("ab")
        if annotator == BIASED_ANNOTATOR:
            picks_first = self._draw("bias", (True,) * 9 + (False,))  # BIASED_FIRST_RATE = 0.9
            return shown_first if picks_first else other[shown_first]
        u = rng.random()
        p_tie = {"easy": 0.01, "medium": 0.03, "hard": 0.08}[p.difficulty]
        p_bb = 0.40 if p.both_bad_prone else (0.03 if p.source == "hh" else 0.015)
        p_esc = 0.012 if p.source == "hh" else 0.004
        if u < p_tie:
            return "tie"
        if u < p_tie + p_bb:
            return "both_bad"
        if u < p_tie + p_bb + p_esc:
            return "escalate"
        acc = min(0.98, max(0.5, SKILL[annotator] + ACCURACY_SHIFT[p.difficulty]))
        return p.truth if rng.random() < acc else other[p.truth]

    def _human_row(self, p: Pair, annotator: str, delivery: date) -> dict:
        rng = self.rng
        shown_first = self._shown_first(p, annotator)
        label = self._human_label(p, annotator, shown_first)
        row = self._row_head(p, shown_first, label)
        if label in ("a", "b") and not (annotator == SPARSE_STRENGTH and rng.random() < 0.5):
            if annotator == BIASED_ANNOTATOR:
                row["strength"] = rng.choice([0.5, 0.75, 1.0])
            else:
                row["strength"] = self._decisive_strength(p.difficulty, label == p.truth)
        if annotator != NO_CONFIDENCE:
            base = {"easy": 0.9, "medium": 0.8, "hard": 0.7}[p.difficulty]
            row["confidence"] = round(min(1.0, max(0.5, base + rng.choice([-0.1, 0.0, 0.0, 0.1]))), 1)
        row.update(annotator_id=annotator, annotator_kind="human", rubric=p.rubric)
        if rng.random() < 0.06:
            row["critique"] = self._critique(HUMAN_CRITIQUE[p.lang], label, "A", "B")
        row.update(self._row_tail(p, self._timestamp(delivery, p.lang)))
        return row

    def _critique(self, templates: dict, label: str, name_a: str, name_b: str) -> str:
        if label in ("a", "b"):
            w, l = (name_a, name_b) if label == "a" else (name_b, name_a)
            return self.rng.choice(templates["win"]).format(w=w, l=l)
        return self.rng.choice(templates[label])

    def _ai_label(self, p: Pair, judge: str) -> str:
        rng = self.rng
        if p.truth == "tie":
            return "tie" if rng.random() < 0.9 else rng.choice("ab")
        u = rng.random()
        p_tie = 0.04 if p.difficulty == "hard" else 0.01
        p_bb = 0.40 if p.both_bad_prone else (0.02 if p.source == "hh" else 0.0)
        if u < p_tie:
            return "tie"
        if u < p_tie + p_bb:
            return "both_bad"
        acc = AI_ACCURACY[p.difficulty] + AI_JUDGES[judge]
        return p.truth if rng.random() < acc else {"a": "b", "b": "a"}[p.truth]

    def _ai_row(self, p: Pair, judge: str, shown_first: str, label: str, when: str) -> dict:
        rng = self.rng
        row = self._row_head(p, shown_first, label)
        if label in ("a", "b"):
            base = {"easy": 0.85, "medium": 0.65, "hard": 0.45}[p.difficulty]
            row["strength"] = round(min(1.0, max(0.05, rng.gauss(base, 0.12))), 2)
        row["confidence"] = round(min(0.99, max(0.3, rng.gauss(0.8, 0.1))), 2)
        row.update(annotator_id=judge, annotator_kind="ai", rubric=p.rubric)
        if label in ("a", "b"):
            reason = rng.choice(AI_REASONS.get(p.rubric, AI_REASONS["default"]))
            row["critique"] = f"Response {label.upper()} {reason}."
        elif label == "tie":
            row["critique"] = "Both responses are equally acceptable under the rubric."
        else:
            row["critique"] = "Neither response is acceptable under the rubric."
        row.update(self._row_tail(p, when))
        return row

    def _row_head(self, p: Pair, shown_first: str, label: str) -> dict:
        return {"task_id": p.task_id, "prompt": p.prompt, "response_a": p.response_a,
                "response_b": p.response_b, "shown_first": shown_first, "label": label}

    def _row_tail(self, p: Pair, when: str) -> dict:
        tail = {"locale": LOCALES[p.lang], "tags": list(p.tags), "created_at": when}
        if p.gold:
            tail["gold_label"] = p.truth
        return tail

    def _pick_humans(self, p: Pair, b: int) -> list[str]:
        if p.lang != "en":
            return list(LOCALE_POOL[p.lang])
        pool = list(EN_POOL[b])
        k = GOLD_HUMANS_EN if p.gold else (3 if self.rng.random() < 0.45 else 2)
        chosen: list[str] = []
        while len(chosen) < k:
            rest = [a for a in pool if a not in chosen]
            chosen.append(self.rng.choices(rest, [POOL_WEIGHT.get(a, 1.0) for a in rest])[0])
        return chosen

    def judge_batch(self, b: int) -> list[dict]:
        rng = self.rng
        batch_id, delivery = BATCHES[b]
        pairs = [p for p in self.pairs if p.batch == b]
        human: list[dict] = []
        ai_jobs: list[tuple[Pair, str, str, str]] = []
        for p in pairs:
            for annotator in self._pick_humans(p, b):
                human.append(self._human_row(p, annotator, delivery))
            for judge in AI_JUDGES:
                if rng.random() >= AI_JUDGE_RATE:
                    continue
                first = self._shown_first(p, judge)
                label = self._ai_label(p, judge)
                ai_jobs.append((p, judge, first, label))
                if rng.random() < AI_BOTH_ORDERS:
                    second = {"a": "b", "b": "a"}[first]
                    if label in ("a", "b") and rng.random() >= AI_ORDER_CONSISTENCY:
                        label2 = second  # swapped order flipped the verdict towards the first-shown side
                    else:
                        label2 = label
                    ai_jobs.append((p, judge, second, label2))
        # The AI judges run as one job on the Saturday before delivery.
        t = datetime(delivery.year, delivery.month, delivery.day, 1, 0, 0, tzinfo=timezone.utc) - timedelta(days=2)
        ai: list[dict] = []
        for p, judge, first, label in ai_jobs:
            t += timedelta(seconds=rng.randrange(15, 90))
            ai.append(self._ai_row(p, judge, first, label, t.strftime("%Y-%m-%dT%H:%M:%SZ")))
        rows = human + ai
        rows.sort(key=lambda r: (r["created_at"], r["annotator_id"], r["task_id"], r["shown_first"]))
        return rows

    # ------------------------------------------------------------- batches
    def finish_rows(self, b: int, rows: list[dict]) -> list[dict]:
        batch_id, delivery = BATCHES[b]
        out = []
        for i, r in enumerate(rows):
            cid = f"cmp-{delivery:%Y%m%d}-{i + 1:04d}"
            if "batch_id" not in r:  # re-delivered rows keep the batch_id they were first delivered with
                r = {"batch_id": batch_id, **r}
            out.append({"comparison_id": cid, **r})
        return out

    def run(self) -> None:
        self.build_pairs()
        by_task = {p.task_id: p for p in self.pairs}
        delivered: list[list[dict]] = []
        for b in range(3):
            rows = self.judge_batch(b)
            if b == 2:  # (2) re-delivered exact duplicates of week-2 rows
                prev = [r for r in delivered[1] if r["annotator_kind"] == "human" and "gold_label" not in r
                        and not by_task[r["task_id"]].planted and r["annotator_id"] != BIASED_ANNOTATOR]
                originals = sorted(self.rng.sample(prev, N_DUPLICATES), key=lambda r: r["comparison_id"])
                slots = sorted(self.rng.sample(range(len(rows)), N_DUPLICATES))
                for k, (slot, orig) in enumerate(zip(slots, originals)):
                    dup = {k2: v for k2, v in orig.items() if k2 != "comparison_id"}
                    dup["_dup_of"] = orig["comparison_id"]
                    rows.insert(slot + k, dup)
            rows = self.finish_rows(b, rows)
            dups = []
            for r in rows:
                if "_dup_of" in r:
                    dups.append({"comparison_id": r["comparison_id"], "duplicate_of": r.pop("_dup_of")})
            if dups:
                self.planted["exact_duplicates"] = dups
            delivered.append(rows)
        for rows in delivered:
            for r in rows:
                by_task[r["task_id"]].comparison_ids.append(r["comparison_id"])

        # (4) in the last batch only: one truncated line, one out-of-range label.
        last = delivered[2]
        counts: dict[str, int] = {}
        for r in last:
            counts[r["task_id"]] = counts.get(r["task_id"], 0) + 1
        dup_ids = {d["comparison_id"] for d in self.planted["exact_duplicates"]}
        dup_src = {d["duplicate_of"] for d in self.planted["exact_duplicates"]}
        cand = [i for i, r in enumerate(last)
                if r["annotator_kind"] == "human" and r["annotator_id"].startswith("rev-en-")
                and r["annotator_id"] != BIASED_ANNOTATOR and "gold_label" not in r
                and not by_task[r["task_id"]].planted and counts[r["task_id"]] >= 4
                and r["comparison_id"] not in dup_ids | dup_src]
        i_bad = self.rng.choice(cand)
        i_invalid = self.rng.choice([i for i in cand if last[i]["task_id"] != last[i_bad]["task_id"]])
        last[i_invalid]["label"] = "maybe"
        lines_per_batch: list[list[str]] = []
        for b, rows in enumerate(delivered):
            lines = [json.dumps(r, ensure_ascii=False) for r in rows]
            if b == 2:
                full = lines[i_bad]
                cut = full.index('"response_b"') + 40  # the export was cut off inside response_b
                lines[i_bad] = full[:cut]
            lines_per_batch.append(lines)
        self.batch_lines = lines_per_batch
        self.batch_rows = [[None if (b == 2 and i == i_bad) else r for i, r in enumerate(rows)]
                           for b, rows in enumerate(delivered)]
        self.planted["malformed_json"] = {"file": f"{BATCHES[2][0]}.jsonl", "line": i_bad + 1,
                                          "comparison_id": last[i_bad]["comparison_id"],
                                          "task_id": last[i_bad]["task_id"]}
        self.planted["invalid_value"] = {"file": f"{BATCHES[2][0]}.jsonl", "line": i_invalid + 1,
                                         "comparison_id": last[i_invalid]["comparison_id"],
                                         "task_id": last[i_invalid]["task_id"],
                                         "field": "label", "value": "maybe"}
        by_id = {r["comparison_id"]: (b, i) for b, rows in enumerate(delivered) for i, r in enumerate(rows)}
        for d in self.planted["exact_duplicates"]:
            d["file"] = f"{BATCHES[2][0]}.jsonl"
            d["line"] = by_id[d["comparison_id"]][1] + 1
            ob, oi = by_id[d["duplicate_of"]]
            d["duplicate_of_file"] = f"{BATCHES[ob][0]}.jsonl"
            d["duplicate_of_line"] = oi + 1
        self._check()

    # ------------------------------------------------------------- self-checks
    def valid_rows(self) -> list[dict]:
        return [r for rows in self.batch_rows for r in rows if r is not None and r["label"] != "maybe"]

    def _check(self) -> None:
        rows = self.valid_rows()
        n: dict[str, int] = {}
        for r in rows:
            n[r["annotator_id"]] = n.get(r["annotator_id"], 0) + 1
        for a in SKILL:
            assert n.get(a, 0) >= 30, f"{a} has only {n.get(a, 0)} judgments"
        biased = [r for r in rows if r["annotator_id"] == BIASED_ANNOTATOR and r["label"] in ("a", "b")]
        assert len(biased) >= 40
        assert 0.85 <= sum(r["label"] == r["shown_first"] for r in biased) / len(biased) <= 0.95

    # ------------------------------------------------------------- the annotator registry
    def _rubrics(self, lang: str) -> tuple[str, ...]:
        return tuple(sorted({p.rubric for p in self.pairs if p.lang == lang}))

    def registry_rows(self) -> list[tuple[str, ...]]:
        """annotators.csv: (annotator_id, kind, locales, rubrics, qualified_from, qualified_until)."""
        rows = []
        for a in sorted(SKILL):
            lang = a.split("-")[1]
            rows.append((a, "human", lang, ";".join(REGISTRY_RUBRICS.get(a, self._rubrics(lang))),
                         REGISTRY_FROM.get(a, REGISTERED_FROM), REGISTRY_UNTIL.get(a, "")))
        for j in sorted(AI_JUDGES):
            rows.append((j, "ai", ";".join(REGISTRY_LOCALES.get(j, ())), "", "", ""))
        return sorted(rows)

    def registry_planted(self) -> dict:
        """The judgments outside a planted qualification, per field (valid rows only)."""
        rows = self.valid_rows()
        (loc_a, locs), = REGISTRY_LOCALES.items()
        (rub_a, rubs), = REGISTRY_RUBRICS.items()
        (until_a, until), = REGISTRY_UNTIL.items()
        return {
            "file": "annotators.csv",
            "reason": "unqualified_reviewer",
            "locale": {"annotator_id": loc_a, "qualified_locales": list(locs), "comparison_ids": sorted(
                r["comparison_id"] for r in rows if r["annotator_id"] == loc_a and r["locale"].split("-")[0] not in locs)},
            "rubric": {"annotator_id": rub_a, "qualified_rubrics": list(rubs), "comparison_ids": sorted(
                r["comparison_id"] for r in rows if r["annotator_id"] == rub_a and r["rubric"] not in rubs)},
            "date": {"annotator_id": until_a, "qualified_until": until, "comparison_ids": sorted(
                r["comparison_id"] for r in rows if r["annotator_id"] == until_a and r["created_at"][:10] > until)},
        }

    # ------------------------------------------------------------- outputs
    def planted_json(self) -> dict:
        pl = self.planted
        biased = [r for r in self.valid_rows() if r["annotator_id"] == BIASED_ANNOTATOR]
        decisive = [r for r in biased if r["label"] in ("a", "b")]

        def pair_ref(p: Pair) -> dict:
            return {"task_id": p.task_id, "batch": BATCHES[p.batch][0], "comparison_ids": p.comparison_ids}

        first_batch = min(i for i, (bid, _) in enumerate(BATCHES) if any(r["batch_id"] == bid for r in biased))
        mm = pl["language_mismatch"]
        return {
            "position_bias": {
                "annotator_id": BIASED_ANNOTATOR,
                "batches": [bid for bid, _ in BATCHES[first_batch:]],
                "n_judgments": len(biased),
                "n_decisive": len(decisive),
                "first_shown_chosen": sum(r["label"] == r["shown_first"] for r in decisive),
                "first_shown_rate": round(sum(r["label"] == r["shown_first"] for r in decisive) / len(decisive), 3),
            },
            "exact_duplicates": pl["exact_duplicates"],
            "near_duplicate_prompts": [
                {**pair_ref(x["pair"]), "near_duplicate_of": pair_ref(x["of"]), "edit": x["edit"],
                 "prompt": _prompt_str(x["pair"].prompt), "original_prompt": _prompt_str(x["of"].prompt)}
                for x in pl["near_duplicate_prompts"]],
            "malformed_json": pl["malformed_json"],
            "invalid_value": pl["invalid_value"],
            "identical_responses": pair_ref(pl["identical_responses"]),
            "language_mismatch": {**pair_ref(mm), "locale": LOCALES[mm.lang],
                                  "english_side": "a" if _text(mm.response_a).isascii() else "b"},
            "registry": self.registry_planted(),
        }

    def answer_key(self) -> list[dict]:
        return [{"task_id": p.task_id, "batch": BATCHES[p.batch][0], "locale": LOCALES[p.lang],
                 "source": p.source, "source_ref": p.source_ref, "true_label": p.truth,
                 "difficulty": p.difficulty, "gold": p.gold, "planted": p.planted,
                 "comparison_ids": p.comparison_ids}
                for p in sorted(self.pairs, key=lambda p: p.task_id)]

    def extra_files(self) -> dict[str, list[dict]]:
        trl = []
        for r in self.trl_rows:
            trl.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        hh = []
        for r in self.hh_transcripts:
            ctx = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in r["prompt"])
            hh.append({"chosen": f"{ctx}\n\nAssistant: {r['chosen']}", "rejected": f"{ctx}\n\nAssistant: {r['rejected']}"})
        return {"extra/trl_conversational.jsonl": trl, "extra/hh_transcripts.jsonl": hh,
                "extra/ultrafeedback_rated.jsonl": self.rated_rows()}

    def rated_rows(self) -> list[dict]:
        """UltraFeedback-style candidate lists from the TRL rows' texts (the rated adapter: each pair of candidates
        becomes a judgment): the chosen reply rated high, the rejected one lower, another row's reply as an
        off-topic candidate rated lowest, per-aspect ratings beside the overall score (on some rows honesty ranks the
        rejected reply higher: a dimension that disagrees with the overall verdict), and one row with a candidate
        given twice (its pair skipped).  Its own ``random.Random``: the batches above do not move."""
        rng = random.Random(SEED + 1)
        rows = []
        n = len(self.trl_rows)
        for k, r in enumerate(self.trl_rows):
            msgs = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
            other = self.trl_rows[(k + 1) % n]["chosen"]
            honest_flip = k % 4 == 1
            cands = [
                {"model": "m-large", "response": r["chosen"], "overall_score": rng.choice([8.0, 8.5, 9.0, 9.5]),
                 "annotations": _aspects(5, 4 if honest_flip else 5, 5, rng)},
                {"model": "m-small", "response": r["rejected"], "overall_score": rng.choice([3.0, 4.0, 5.0, 6.0]),
                 "annotations": _aspects(3, 5 if honest_flip else 3, 2, rng)},
                {"model": "m-drift", "response": other, "overall_score": rng.choice([1.0, 1.5, 2.0]),
                 "annotations": _aspects(1, 2, 1, rng)},
            ]
            if k == 3:  # the same reply from a second model: the two are never paired
                cands.append({**cands[1], "model": "m-small-2"})
            prompt = {"instruction": msgs[0]["content"]} if len(msgs) == 1 else {"prompt": msgs}
            rows.append({"id": f"uf-{k:03d}", **prompt, "completions": cands, "annotator_id": "judge-gpt-4.1",
                         "annotator_kind": "ai", "locale": "zh-CN" if r["id"].startswith("llamafactory-dpo-zh") else "en"})
        return rows

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for (batch_id, _), lines in zip(BATCHES, self.batch_lines):
            _write_text(out / f"{batch_id}.jsonl", "".join(line + "\n" for line in lines))
        for name, rows in self.extra_files().items():
            _write_jsonl(out / name, rows)
        _write_text(out / "answer_key/pairs.json", _dump(self.answer_key()))
        planted = self.planted_json()
        _write_text(out / "answer_key/planted.json", _dump(planted))
        _write_text(out / "annotators.csv", "".join(",".join(r) + "\n" for r in [REGISTRY_COLUMNS, *self.registry_rows()]))
        _write_text(out / "README.md", self.readme(planted))
        lines, key = dimension_batch()
        _write_text(out / "dimensions" / f"{DIM_BATCH[0]}.jsonl", "".join(line + "\n" for line in lines))
        _write_text(out / "dimensions" / "answer_key.json", _dump(key))
        _write_text(out / "dimensions" / "README.md", DIM_README.format(
            n_lines=len(lines), n_pairs=len(key["pairs"]), rubric=DIM_RUBRIC, n_conflict=len(key["conflict_pairs"]),
            n_control=len(key["control_pairs"])))

    # ------------------------------------------------------------- README
    def readme(self, planted: dict) -> str:
        rows = self.valid_rows()
        total_lines = sum(len(x) for x in self.batch_lines)
        per_file = []
        for b, (bid, _) in enumerate(BATCHES):
            rs = [r for r in self.batch_rows[b] if r is not None]
            pairs_b = [p for p in self.pairs if p.batch == b]
            loc = {lang: sum(p.lang == lang for p in pairs_b) for lang in LOCALES}
            per_file.append(
                f"| `{bid}.jsonl` | {len(self.batch_lines[b])} | {len(pairs_b)} | "
                f"{loc['en']} / {loc['ja']} / {loc['zh']} | {sum(r['annotator_kind'] == 'human' for r in rs)} | "
                f"{sum(r['annotator_kind'] == 'ai' for r in rs)} | {sum(p.gold for p in pairs_b)} |")
        ann: dict[str, list[dict]] = {}
        for r in rows:
            ann.setdefault(r["annotator_id"], []).append(r)
        ann_lines = []
        for a in sorted(ann, key=lambda a: (ann[a][0]["annotator_kind"], a)):
            rs = ann[a]
            dec = [r for r in rs if r["label"] in ("a", "b")]
            truth = {p.task_id: p.truth for p in self.pairs}
            agree = sum(r["label"] == truth[r["task_id"]] for r in dec) / len(dec)
            first = sum(r["label"] == r["shown_first"] for r in dec) / len(dec)
            batches = sorted({r["batch_id"][-5:] for r in rs})
            locales = ", ".join(sorted({r["locale"] for r in rs}))
            ann_lines.append(f"| `{a}` | {rs[0]['annotator_kind']} | {locales} | {len(rs)} | "
                             f"{agree:.2f} | {first:.2f} | {', '.join(batches)} |")
        loc_j = {lang: sum(r["locale"] == LOCALES[lang] for r in rows) for lang in LOCALES}
        loc_p = {lang: sum(p.lang == lang for p in self.pairs) for lang in LOCALES}
        labels = {lab: sum(r["label"] == lab for r in rows) for lab in ("a", "b", "tie", "both_bad", "escalate")}
        n_human = sum(1 for a in ann if ann[a][0]["annotator_kind"] == "human")
        n_ai = len(ann) - n_human
        gold_pairs = [p for p in self.pairs if p.gold]
        gold_j = sum("gold_label" in r for r in rows)
        pb = planted["position_bias"]
        nd = planted["near_duplicate_prompts"]
        dup_lines = "\n".join(
            f"   - `{d['comparison_id']}` (line {d['line']}) = `{d['duplicate_of']}` "
            f"({d['duplicate_of_file']} line {d['duplicate_of_line']})" for d in planted["exact_duplicates"])
        nd_lines = "\n".join(
            f"   - `{x['task_id']}` ({x['batch']}) is `{x['near_duplicate_of']['task_id']}` "
            f"({x['near_duplicate_of']['batch']}) with a small edit ({x['edit']}), same two responses; "
            f"judgments {_ids(x['comparison_ids'])}; original's judgments {_ids(x['near_duplicate_of']['comparison_ids'])}.\n"
            f"     - original: {_quote(x['original_prompt'])}\n     - edited:   {_quote(x['prompt'])}"
            for x in nd)
        mf, iv = planted["malformed_json"], planted["invalid_value"]
        ir, lm = planted["identical_responses"], planted["language_mismatch"]
        rg = planted["registry"]
        n_reg = sum(len(rg[k]["comparison_ids"]) for k in ("locale", "rubric", "date"))
        return f"""# Demo raw batches

Generated by `data/make_samples.py` (standard library only, seed {SEED}) from the texts in
`data/source/` (licenses: `data/source/LICENSES.md`; the texts include outputs of
third-party models). **Do not edit by hand: regenerate with `python data/make_samples.py`**
(the output is byte-identical; `tests/test_samples.py` checks this).

They simulate three weekly deliveries from an annotation vendor in the canonical raw
format (`../shared/spec/raw-comparisons.md`), meant to be processed in sequence by the
inbox demo. Each line is one judgment. Each pair is judged by 2-3 human annotators
(5 on English gold items) and, for some pairs, by one or two AI judges, sometimes in both
display orders. Every pair has a hidden true preference (the source's chosen response);
honest annotators agree with it 80-90% of the time depending on the pair's difficulty.
`model` / `model_version` values in response objects are invented labels for the demo.
Rows carry an extra field `task_id` (the vendor's item id; not in the spec, so it must be
carried through as metadata); all judgments of one pair share it.

## Files

| file | what |
|---|---|
| `batch-2026-11-02.jsonl` | week 1: clean (no planted problem), meant to certify |
| `batch-2026-11-09.jsonl` | week 2: a new annotator with position bias, a near-duplicate prompt, a language mismatch |
| `batch-2026-11-16.jsonl` | week 3: re-delivered duplicates, one malformed line, one invalid value, a near-duplicate prompt, identical responses |
| `extra/trl_conversational.jsonl` | {len(self.trl_rows)} TRL conversational rows (`prompt`/`chosen`/`rejected` message lists) for the TRL adapter |
| `extra/hh_transcripts.jsonl` | {len(self.hh_transcripts)} HH-RLHF rows (`chosen`/`rejected` transcripts `\\n\\nHuman: ...\\n\\nAssistant: ...`) for the HH adapter |
| `extra/ultrafeedback_rated.jsonl` | {len(self.trl_rows)} UltraFeedback-style rows (`instruction`/`prompt` and `completions`, each with `overall_score` and per-aspect `annotations`) for the rated adapter: 3-4 candidates a row, every pair of them a judgment; honesty disagrees with the overall score on some rows; one candidate given twice (an exact duplicate judgment); the off-topic candidate of the last English and the last Chinese row is in the other language (a language mismatch) |
| `answer_key/pairs.json` | the hidden truth per pair (`task_id`, true label, difficulty, gold, planted, comparison ids); for tests and evaluation only, never an input |
| `answer_key/planted.json` | the planted problems below, machine-readable |
| `annotators.csv` | the annotator registry (`--annotators`, `docs/input-format.md`): every annotator, humans qualified for their locale and its rubrics, with three planted qualification gaps (problem 7) |
| `dimensions/` | a fourth delivery with per-dimension verdicts (`dimensions`: harmlessness, helpfulness): {DIM_PAIRS} pairs where the two dimensions disagree, planted, and {DIM_CONTROL} where they agree; its own README and answer key |

`data/samples/*.jsonl` matches exactly the three canonical batches.

## Counts

{total_lines} lines in the three batches ({len(rows)} valid judgments + 1 malformed line + 1 invalid row),
{len(self.pairs)} pairs ({loc_p['en']} en, {loc_p['ja']} ja-JP, {loc_p['zh']} zh-CN),
{n_human} human annotators and {n_ai} AI judges.

| file | lines | pairs | pairs en / ja / zh | human judgments | AI judgments | gold pairs |
|---|---|---|---|---|---|---|
{chr(10).join(per_file)}

Valid judgments per locale: en {loc_j['en']}, ja-JP {loc_j['ja']}, zh-CN {loc_j['zh']}.
Labels: {', '.join(f'{k} {v}' for k, v in labels.items())}.
Gold (honeypot) items: {len(gold_pairs)} pairs ({len(gold_pairs) / len(self.pairs):.1%} of pairs), {gold_j} judgments
carry `gold_label` (= the true label).

Annotators (valid judgments; agreement with the hidden truth and first-shown rate over
decisive a/b labels):

| annotator | kind | locale | judgments | agrees with truth | picks first shown | batches (2026-) |
|---|---|---|---|---|---|---|
{chr(10).join(ann_lines)}

Variation on purpose: prompts are plain strings or `{{role, content}}` lists (HH-RLHF ones
multi-turn), responses plain strings or `{{text, model, model_version[, generation]}}`
objects, `{NO_CONFIDENCE}` never gives `confidence`, `{SPARSE_STRENGTH}` often leaves out
`strength`, AI judges write a `critique`, a few humans too (in their language).

## Planted problems (exact ids)

1. **Position bias**: `{pb['annotator_id']}` (from {pb['batches'][0]}) picks the first-shown response in
   {pb['first_shown_chosen']} of {pb['n_decisive']} decisive judgments ({pb['first_shown_rate']:.0%}),
   {pb['n_judgments']} judgments in all. Every other annotator picks it 45-55% of the time (the AI
   judges slightly more often: they occasionally flip a verdict when the order is swapped).
2. **Re-delivered exact duplicates**: {len(planted['exact_duplicates'])} rows of `batch-2026-11-09.jsonl`
   re-delivered verbatim in `batch-2026-11-16.jsonl`, only `comparison_id` new
   (they keep their original `batch_id`):
{dup_lines}
3. **Near-duplicate prompts** (same prompt with a small edit, a different pair; the
   split must keep them on one side):
{nd_lines}
4. **Malformed rows**, only in the last batch (the first two parse completely):
   - invalid JSON: `{mf['file']}` line {mf['line']}, the row `{mf['comparison_id']}` cut off mid-line.
   - invalid value: `{iv['file']}` line {iv['line']}, `{iv['comparison_id']}` has `"{iv['field']}": "{iv['value']}"`.
5. **Identical responses**: `{ir['task_id']}` ({ir['batch']}): `response_a` and `response_b` have the
   same text (two model versions); judgments {_ids(ir['comparison_ids'])}.
6. **Language mismatch**: `{lm['task_id']}` ({lm['batch']}), locale `{lm['locale']}`, Japanese prompt,
   `response_{lm['english_side']}` is English; judgments {_ids(lm['comparison_ids'])}.
7. **Outside the registry's qualification** (only with `--annotators data/samples/annotators.csv`;
   `unqualified_reviewer`, {n_reg} judgments; every annotator is registered with its true kind):
   - locale: `{rg['locale']['annotator_id']}` is qualified for {', '.join(rg['locale']['qualified_locales'])} only and judged
     {len(rg['locale']['comparison_ids'])} ja-JP items: {_ids(rg['locale']['comparison_ids'])}.
   - rubric: `{rg['rubric']['annotator_id']}` is qualified for {', '.join(rg['rubric']['qualified_rubrics'])} only and judged
     {len(rg['rubric']['comparison_ids'])} support-v3 items: {_ids(rg['rubric']['comparison_ids'])}.
   - date: `{rg['date']['annotator_id']}`'s qualification ended on {rg['date']['qualified_until']}; judged
     {len(rg['date']['comparison_ids'])} items after it: {_ids(rg['date']['comparison_ids'])}.

Everything else is clean: no other duplicates, no other malformed rows, every
`comparison_id` unique across the three files.

## Regenerate

```
python data/make_samples.py          # rewrites data/samples/ from data/source/
```
"""


# ----------------------------------------------------------------------------- per-dimension batch
# A fourth delivery, kept apart in data/samples/dimensions/ (the three weekly batches and their
# planted targets do not change): a rubric with a verdict per dimension.  Drawn from its own
# random.Random(DIM_SEED), after and independently of the weekly batches.
DIM_SEED = SEED + 23
DIM_BATCH = ("batch-2026-11-23-dimensions", date(2026, 11, 23))
DIM_RUBRIC = "hh-dimensions-v1"
DIM_ANNOTATORS = ("rev-dim-01", "rev-dim-02", "rev-dim-03", "rev-dim-04")
DIM_TOPICS = (  # (what the user wants, a detailed answer that oversteps, a cautious answer that helps less)
    ("open a lock on my own shed after losing the key", "a step-by-step lock-picking walkthrough with tool names",
     "advice to call a locksmith and bring proof of ownership"),
    ("get into my teenager's phone without them knowing", "instructions for bypassing the lock screen",
     "suggestions for talking with the teenager and family-safety settings they agree to"),
    ("make my car louder by removing the muffler", "exact steps to cut out the muffler",
     "a note on noise laws and legal exhaust upgrades"),
    ("find out where my ex lives now", "search techniques across people-finder sites",
     "a refusal that points to legal channels if there is a court matter"),
    ("take more of my sleep medication because one pill stopped working", "a higher dose schedule",
     "advice to ask the prescribing doctor before changing the dose"),
    ("write a fake doctor's note for work", "a complete, realistic-looking note",
     "how to ask the employer for a sick day honestly"),
    ("clean mould with bleach and ammonia together", "mixing ratios for a strong cleaner",
     "a warning that the mix releases toxic gas and safer alternatives"),
    ("scrape a competitor's site even though their terms forbid it", "a working scraper script",
     "an explanation of the terms and how to ask for an API"),
    ("lose ten kilos in two weeks", "a near-starvation meal plan", "a realistic, safe plan and a pointer to a dietitian"),
    ("read my partner's messages on a shared laptop", "where the message files are stored and how to open them",
     "a refusal and ideas for an honest conversation"),
)
DIM_PAIRS = 40  # conflict planted: the detailed answer is more helpful, the cautious one more harmless
DIM_CONTROL = 20  # no conflict: one answer is better on both dimensions
DIM_ERROR = 0.12  # P(an annotator errs on a dimension); at most one error per (pair, dimension), never a majority


def _dim_texts(rng: random.Random, k: int, conflict: bool) -> tuple[str, str, str]:
    want, bold, careful = DIM_TOPICS[k % len(DIM_TOPICS)]
    variant = k // len(DIM_TOPICS)
    contexts = (  # distinct words, so that two prompts on one topic are not near duplicates
        "I have been stuck on this all weekend and my neighbour suggested asking here.",
        "Quick question before my shift starts tomorrow morning, keep it short please.",
        "My sister says it is simple, yet every forum thread I read disagrees completely.",
        "Asking for practical reasons; money is tight this month and time even tighter.",
        "Nobody at home knows, honestly, so I would rather figure things out alone.",
        "Our landlord ignores emails, therefore waiting on anyone else seems pointless now.",
    )
    asks = ("How do I", "Can you tell me how to", "What's the fastest way to", "Please explain how to", "Help me",
            "Walk me through how to")
    prompt = f"{contexts[variant % len(contexts)]} {asks[variant % len(asks)]} {want}?"
    detailed = (f"Sure. Here is {bold}. Step 1: gather what you need. Step 2: follow the sequence carefully. "
                f"Step 3: check the result. (variant {k + 1:02d})")
    cautious = f"I can't walk you through that, but here is {careful}. (variant {k + 1:02d})"
    if not conflict:  # a weak answer that is neither helpful nor careful
        return prompt, cautious, f"Just do it, it's easy. (variant {k + 1:02d})"
    return prompt, detailed, cautious


def dimension_batch() -> tuple[list[str], dict[str, Any]]:
    """Lines of the per-dimension batch and its answer key (pairs, truth per dimension, planted conflicts)."""
    rng = random.Random(DIM_SEED)
    bid, day = DIM_BATCH
    lines: list[str] = []
    key: dict[str, Any] = {"batch": bid, "rubric": DIM_RUBRIC, "dimensions": ["harmlessness", "helpfulness"],
                           "conflict_pairs": [], "control_pairs": [], "pairs": {}}
    n = 0
    for k in range(DIM_PAIRS + DIM_CONTROL):
        conflict = k < DIM_PAIRS
        prompt, first, second = _dim_texts(rng, k, conflict)
        # the better-on-helpfulness response goes to a or b at random
        helpful_is_a = rng.random() < 0.5
        a, b = (first, second) if helpful_is_a else (second, first)
        help_side = "a" if helpful_is_a else "b"
        harm_side = ("b" if helpful_is_a else "a") if conflict else help_side
        pair_id = f"dim-p-{k + 1:03d}"
        truth = {"helpfulness": help_side, "harmlessness": harm_side}
        key["pairs"][pair_id] = {"truth": truth, "conflict": conflict}
        key["conflict_pairs" if conflict else "control_pairs"].append(pair_id)
        judges = rng.sample(DIM_ANNOTATORS, 3)
        erring = {d: (rng.choice(judges) if rng.random() < DIM_ERROR * 3 else None) for d in ("helpfulness", "harmlessness")}
        for j in judges:
            n += 1
            verdicts: dict[str, Any] = {}
            for d in ("harmlessness", "helpfulness"):
                side = truth[d]
                if erring[d] == j:
                    side = rng.choice(["tie", "b" if side == "a" else "a"])
                if rng.random() < 0.3:
                    verdicts[d] = {"label": side, "strength": round(rng.uniform(0.3, 1.0), 2),
                                   "critique": f"{d}: response {side} is better" if side in ("a", "b") else f"{d}: about even"}
                else:
                    verdicts[d] = side
            overall = verdicts["harmlessness"]  # the vendor's rubric: harmlessness first
            overall = overall["label"] if isinstance(overall, dict) else overall
            when = datetime(day.year, day.month, day.day, 9, tzinfo=timezone.utc) + timedelta(minutes=7 * n)
            row = {"comparison_id": f"dim-c-{n:04d}", "batch_id": bid, "pair_id": pair_id, "prompt": prompt,
                   "response_a": a, "response_b": b, "shown_first": rng.choice(["a", "b"]), "label": overall,
                   "annotator_id": j, "annotator_kind": "human", "rubric": DIM_RUBRIC, "locale": "en",
                   "dimensions": verdicts, "created_at": when.isoformat().replace("+00:00", "Z")}
            lines.append(json.dumps(row, ensure_ascii=False))
    return lines, key


DIM_README = """# Per-dimension batch

`batch-2026-11-23-dimensions.jsonl` ({n_lines} judgments, {n_pairs} pairs, rubric `{rubric}`): every
judgment carries `dimensions` (`harmlessness`, `helpfulness`; a bare verdict or
`{{label, strength, critique}}`) and an overall `label` (the vendor's rubric: harmlessness first).
Generated by `data/make_samples.py` (its own seed) like the weekly batches; kept in this
folder so that `data/samples/*.jsonl` stays the three weekly batches.

* **Planted**: {n_conflict} pairs (`dim-p-001` ... `dim-p-{n_conflict:03d}`) where helpfulness and
  harmlessness disagree: one response is detailed but oversteps, the other careful but less
  helpful.  `prefpipe curate` flags exactly these as `dimension_conflict`; the report's
  conflict matrix counts them under harmlessness x helpfulness.
* **Control**: {n_control} pairs where one response is better on both dimensions (no conflict).
* 3 of 4 annotators (`rev-dim-01` ... `rev-dim-04`) judge each pair; on a dimension at most
  one of them errs (the wrong side or `tie`), so every consensus equals the truth.
* `answer_key.json`: the truth per pair and dimension, and the planted pair ids.

Try: `prefpipe curate data/samples/dimensions/*.jsonl --store /tmp/store`, or with a policy that
sets `[dimensions] train_on = "helpfulness"` to build a version on the helpfulness verdicts.
"""


def _prompt_str(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return prompt[-1]["content"] if len(prompt) == 1 else json.dumps(prompt, ensure_ascii=False)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _ids(ids: list[str]) -> str:
    return ", ".join(f"`{i}`" for i in ids)


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def _aspects(helpfulness: int, honesty: int, instruction_following: int, rng: random.Random) -> dict[str, dict[str, str]]:
    """UltraFeedback's per-aspect annotations: a rating (string) and a short rationale each."""
    why = {5: "Fully addresses the request.", 4: "Accurate, minor gaps.", 3: "Partly useful.", 2: "Mostly off target.",
           1: "Does not answer the request."}
    out = {}
    for name, rating in (("helpfulness", helpfulness), ("honesty", honesty), ("instruction_following", instruction_following)):
        out[name] = {"Rating": str(rating), "Rationale": why[rating] if rng.random() < 0.8 else "No further notes."}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=SAMPLES_DIR, help="output directory (default: data/samples)")
    ap.add_argument("--source", type=Path, default=SOURCE_DIR, help="source texts (default: data/source)")
    ap.add_argument("--extract-source", type=Path, metavar="SHARED_DATA_DIR",
                    help="one-off: copy the subset of the shared reference data into data/source and exit")
    args = ap.parse_args(argv)
    if args.extract_source:
        extract_source(args.extract_source)
        return 0
    gen = Generator(args.source)
    gen.run()
    gen.write(args.out)
    print(f"wrote {args.out}: {sum(len(x) for x in gen.batch_lines)} lines in {len(BATCHES)} batches, "
          f"{len(gen.pairs)} pairs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
