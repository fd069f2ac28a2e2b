"""Near-duplicate prompts: signatures against datasketch and a plain reference, recall on
edited copies of real prompts, false flags on distinct real prompts, clusters, the
persistent index (save/load/incremental, datasketch storage backend), edge cases.

Real text: ``data/source/`` (HH-RLHF harmless test, MIT; LLaMA-Factory demo data,
Apache-2.0; licenses in ``data/source/LICENSES.md``); the slow test also reads the shared
reference copies in ``../shared/data`` when they are there.
"""
from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasketch import MinHash, MinHashLSH

from pipeline import kernels
from pipeline.checks import near_duplicates as nd
from pipeline.ingest import judgments_from_records
from schemas.policy import ChecksConfig, NearDuplicateConfig

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data" / "source"
SHARED = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------- plain reference
M32 = (1 << 32) - 1
K = [int(k) for k in nd._K32]
P = kernels.WORD_PRIME
NO_SPACE = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3040, 0x30FF), (0x31F0, 0x31FF),
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x323AF))


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _cls(ch: str) -> int:
    cp = ord(ch)
    if cp >= 0x323B0 or not (ch.isalnum() or unicodedata.category(ch)[0] == "M"):
        return 0
    return 2 if cp == 0x3005 or any(lo <= cp <= hi for lo, hi in NO_SPACE) else 1


def reference_shingles(text: str, max_chars: int = 2000) -> list[int]:
    """Tokenise and hash one text with plain Python loops (the spec of the vectorised code)."""
    t = text[:max_chars].lower()
    cls = [_cls(c) for c in t]
    toks: list[tuple[int, int, int]] = []  # (position, kind, hash)
    i = 0
    while i < len(t):
        if cls[i] == 1:
            j, acc = i, 0
            while j < len(t) and cls[j] == 1:
                acc = (acc + ord(t[j]) * pow(P, j - i, 1 << 32)) & M32
                j += 1
            toks.append((i, 0, _fmix32(acc ^ K[0])))
            i = j
        elif cls[i] == 2:
            c = ord(t[i])
            toks.append((i, 1, _fmix32((c * K[1] + K[2]) & M32)))
            if i + 1 < len(t) and cls[i + 1] == 2:
                toks.append((i, 2, _fmix32((c * K[1] + ord(t[i + 1]) * K[3] + K[4]) & M32)))
            i += 1
        else:
            i += 1
    return [h for _, _, h in sorted(toks)]


# ---------------------------------------------------------------- real prompts and edits
def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SOURCE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def _messages(p) -> list[dict]:
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def source_prompts() -> list[tuple[str, list[dict]]]:
    """(locale, messages) of every prompt in data/source (distinct by construction)."""
    out = []
    for name, loc in (("hh_harmless", "en"), ("llamafactory_dpo_en", "en"), ("llamafactory_dpo_zh", "zh"),
                      ("ja_handwritten", "ja-JP")):
        out += [(loc, _messages(r["prompt"])) for r in _rows(name)]
    return out


def _words(msgs: list[dict]) -> int:
    return len(" ".join(m["content"] for m in msgs if m["role"] != "system").split())


VOCAB = ["really", "please", "quickly", "today", "maybe", "also", "exactly", "again", "now", "just"]


def edit(msgs: list[dict], kind: str, rng: random.Random) -> list[dict]:
    """A copy with one light edit of the first user turn."""
    msgs = [dict(m) for m in msgs]
    i = next(k for k, m in enumerate(msgs) if m["role"] == "user")
    t = msgs[i]["content"]
    cjk = re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", t) is not None
    if kind == "case":
        t = t.upper() if rng.random() < 0.5 else t.lower()
    elif kind == "punct":
        t = re.sub(r"[?.!,;:]+(?=\s|$)", "", t) + rng.choice(["?", "!!", " ...", "."])
    elif kind == "space":
        t = re.sub(r" ", lambda _: rng.choice([" ", "  ", "\n", " \t "]), t)
    elif kind == "add":
        if cjk:
            k = rng.randrange(len(t) + 1)
            t = t[:k] + "非常" + t[k:]
        else:
            w = t.split(" ")
            w.insert(rng.randrange(len(w) + 1), rng.choice(VOCAB))
            t = " ".join(w)
    elif kind == "drop":
        if cjk:
            k = rng.randrange(len(t) - 1)
            t = t[:k] + t[k + 2:]
        else:
            w = t.split(" ")
            del w[rng.randrange(len(w))]
            t = " ".join(w)
    msgs[i]["content"] = t
    return msgs


def frame_of(items: list[list[dict]], locales: list[str] | None = None) -> pl.DataFrame:
    """One judgment per prompt, each its own pair (responses unique per item)."""
    recs = [{
        "comparison_id": f"c-{i:05d}", "pair_id": f"p-{i:05d}", "prompt": msgs,
        "response_a": f"answer one {i}", "response_b": f"answer two {i}", "label": "a",
        "annotator_id": "rev-1", "annotator_kind": "human", "locale": (locales or ["en"] * len(items))[i],
    } for i, msgs in enumerate(items)]
    return judgments_from_records(recs)


KINDS = ("case", "punct", "space", "add", "drop")


def edited_set(prompts: list[list[dict]], seed: int = 0) -> tuple[list[list[dict]], dict[str, list[int]]]:
    """Originals (rows 0..n-1) followed by one edited copy per (prompt, kind)."""
    rng = random.Random(seed)
    items = list(prompts)
    by_kind: dict[str, list[int]] = {k: [] for k in KINDS}
    for p in prompts:
        for kind in KINDS:
            by_kind[kind].append(len(items))
            items.append(edit(p, kind, rng))
    return items, by_kind


# ---------------------------------------------------------------- signatures
def test_shingles_match_plain_reference_and_signatures_match_datasketch():
    texts = [m[0]["content"] if len(m) == 1 else "\n".join(x["content"] for x in m) for _, m in source_prompts()[::7]]
    texts += ["", "???", "Hello, World!", "hello world", "你好世界", "東京", "今日は、いい天気ですね。Python 3.11 で",
              "Ünïcödé ÇASE straße İstanbul", "สวัสดีครับ", "नमस्ते दुनिया", "a" * 3000, "x_y-z 12,5 ½ ²",
              "𠀀𠀁 emoji 🙂 done", "nul\x00inside"]
    sh, counts = nd.shingle_hashes(texts)
    ends = np.cumsum(counts)
    sigs = nd.signatures(texts, NearDuplicateConfig(num_perm=64, seed=3))
    for i, t in enumerate(texts):
        got = sh[ends[i] - counts[i]:ends[i]].tolist()
        ref = reference_shingles(t)
        if ref:
            assert got == ref, t[:40]
        else:
            assert len(got) == 1  # whole-text fallback
        m = MinHash(num_perm=64, seed=3, hashfunc=lambda x: x)
        m.update_batch(got)
        assert np.array_equal(m.hashvalues, sigs[i]), t[:40]


def test_normalisation_edits_give_identical_signatures():
    base = "How do I make a really good sourdough starter at home?"
    variants = [base.upper(), base.replace("?", ""), base.replace(" ", "   "), "  " + base.replace(" ", "\n") + " !!"]
    sigs = nd.signatures([base, *variants])
    assert all(np.array_equal(sigs[0], s) for s in sigs[1:])


def test_estimated_jaccard_tracks_true_jaccard_like_datasketch():
    rng = random.Random(1)
    prompts = [m for _, m in source_prompts() if _words(m) >= 5]
    texts_a, texts_b = [], []
    for p in prompts:
        q = p
        for _ in range(rng.randrange(0, 12)):  # 0-11 edits: true Jaccard spread over (0, 1]
            q = edit(q, rng.choice(("add", "drop")), rng)
        texts_a.append("\n".join(m["content"] for m in p))
        texts_b.append("\n".join(m["content"] for m in q))
    cfg = NearDuplicateConfig(num_perm=128)
    est = nd.estimated_jaccard(nd.signatures(texts_a, cfg), nd.signatures(texts_b, cfg))
    true, theirs = [], []
    for a, b in zip(texts_a, texts_b):
        sa, sb = set(reference_shingles(a)), set(reference_shingles(b))
        true.append(len(sa & sb) / len(sa | sb))
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)  # datasketch's own hashing (sha1)
        ma.update_batch([str(x).encode() for x in sa])
        mb.update_batch([str(x).encode() for x in sb])
        theirs.append(ma.jaccard(mb))
    true, theirs = np.array(true), np.array(theirs)
    assert true.min() < 0.5 < 0.9 < true.max()
    err, err_ds = np.abs(est - true), np.abs(theirs - true)
    sigma = np.sqrt(true * (1 - true) / 128) + 1e-9
    assert (err <= 4.5 * sigma + 1e-6).mean() >= 0.99
    assert abs(float(np.mean(est - true))) < 0.01  # unbiased
    assert err.mean() <= 1.3 * err_ds.mean() + 0.005  # as accurate as datasketch's own sketches


def test_vectorised_banding_finds_the_same_candidates_as_datasketch_lsh():
    rng = random.Random(2)
    prompts = [m for _, m in source_prompts()]
    items = prompts + [edit(p, rng.choice(KINDS), rng) for p in prompts[:150]]
    texts = ["\n".join(m["content"] for m in p) for p in items]
    cfg = NearDuplicateConfig()
    sigs = nd.signatures(texts, cfg)
    b, r = nd.band_params(cfg)
    lsh = MinHashLSH(threshold=cfg.candidate_threshold, num_perm=cfg.num_perm)
    assert (lsh.b, lsh.r) == (b, r)
    ms = [MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashvalues=s, scheme="affine32") for s in sigs]
    for i, m in enumerate(ms):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(ms) for j in lsh.query(m) if j != i}
    ours = {tuple(x) for x in nd._bucket_pairs(nd._band_keys(sigs, b, r), 0).tolist()}
    assert theirs and ours == theirs


# ---------------------------------------------------------------- recall and false flags
def _flagged_rows(result) -> set[int]:
    return {int(s.split("-")[1]) for s in result.flags["subject_id"].to_list()}


def test_recall_on_edited_copies_of_real_prompts():
    bases = [m for loc, m in source_prompts() if loc == "en" and 5 <= _words(m) <= 60]
    bases += [m for loc, m in source_prompts() if loc != "en" and len(m[-1]["content"]) >= 8]
    assert len(bases) >= 200
    items, by_kind = edited_set(bases)
    res = nd.run(frame_of(items), ChecksConfig())
    flagged = _flagged_rows(res)
    recalls = {k: len(flagged & set(rows)) / len(rows) for k, rows in by_kind.items()}
    for kind in ("case", "punct", "space"):
        assert recalls[kind] == 1.0, recalls
    assert recalls["add"] >= 0.95 and recalls["drop"] >= 0.95, recalls
    # the originals are flagged too (they have a near duplicate) and share a cluster with every copy
    assert len(flagged & set(range(len(bases)))) / len(bases) >= 0.95
    cl = dict(res.tables["clusters"].iter_rows())
    same = [all(cl[f"p-{i:05d}"] == cl[f"p-{rows[k]:05d}"] for rows in by_kind.values()) for k, i in enumerate(range(len(bases)))]
    assert np.mean(same) >= 0.95
    assert res.status == "warn" and res.flags["reason"].unique().to_list() == ["near_duplicate"]


def test_no_flags_on_distinct_real_prompts():
    items = source_prompts()
    res = nd.run(frame_of([m for _, m in items], [loc for loc, _ in items]), ChecksConfig())
    assert res.flags.height <= 0.02 * len(items), res.flags["detail"].to_list()
    assert res.flags.height == 0, res.flags["detail"].to_list()
    assert res.status == "pass" and res.metrics["clusters"] == len(items)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="shared reference data not available")
def test_shared_data_recall_and_distinct_false_flags():
    from pipeline.ingest import ingest_files

    j = ingest_files(sorted(SHARED.glob("*.jsonl"))).judgments
    first_turn = j.select("prompt_hash", first=pl.col("prompt").list.first().struct.field("content").str.to_lowercase()
                          .str.replace_all(r"\W+", " ").str.strip_chars())
    # distinct: one prompt per opening user turn (HH has continuations of one conversation)
    distinct = first_turn.unique("first", keep="first").unique("prompt_hash")
    dj = j.join(distinct.select("prompt_hash"), on="prompt_hash", how="semi")
    res = nd.run(dj, ChecksConfig())
    pairs = dj["pair_id"].n_unique()
    assert res.metrics["near_duplicate_pairs"] <= 0.02 * pairs, res.metrics
    bases = [msgs for msgs in j.unique("prompt_hash").sort("prompt_hash")["prompt"].to_list()
             if 5 <= _words(msgs) <= 60][:1500]
    items, by_kind = edited_set(bases, seed=5)
    flagged = _flagged_rows(nd.run(frame_of(items), ChecksConfig()))
    edited = [r for rows in by_kind.values() for r in rows]
    assert len(flagged & set(edited)) / len(edited) >= 0.97


# ---------------------------------------------------------------- clusters and flags
def test_clusters_cover_every_pair_and_are_deterministic():
    rng = random.Random(4)
    bases = [m for _, m in source_prompts()[:60]]
    items = bases + [edit(bases[i], "add", rng) for i in range(10)] + [bases[20]] * 3  # 3 more pairs, same prompt
    j = frame_of(items)
    res = nd.run(j)
    cl = res.tables["clusters"]
    assert cl.height == j["pair_id"].n_unique() and cl["near_dup_cluster"].null_count() == 0
    c = dict(cl.iter_rows())
    assert c["p-00070"] == c["p-00071"] == c["p-00072"] == c["p-00020"]
    assert "p-00020" not in set(res.flags["subject_id"])  # same prompt_hash only: clustered, not flagged
    for i in range(10):
        assert c[f"p-{60 + i:05d}"] == c[f"p-{i:05d}"]
    # the cluster id is the smallest prompt_hash of the component
    ph = dict(j.select("pair_id", "prompt_hash").iter_rows())
    for name, grp in cl.with_columns(ph=pl.col("pair_id").replace_strict(ph)).group_by("near_dup_cluster"):
        assert name[0] == grp["ph"].min()
    shuffled = nd.run(j.sample(fraction=1.0, shuffle=True, seed=9))
    assert shuffled.tables["clusters"].equals(cl)
    assert shuffled.flags.sort("subject_id").equals(res.flags.sort("subject_id"))


def test_pair_with_two_prompt_hashes_gets_one_cluster():
    recs = [{"comparison_id": f"c{i}", "pair_id": "p-x", "prompt": t, "response_a": "r1", "response_b": "r2",
             "label": "a", "annotator_id": "u", "annotator_kind": "human"} for i, t in enumerate(["alpha beta", "gamma delta"])]
    res = nd.run(judgments_from_records(recs))
    assert res.tables["clusters"].height == 1 and res.flags.height == 0


# ---------------------------------------------------------------- the persistent index
def test_index_incremental_save_load_equals_one_shot(tmp_path):
    rng = random.Random(6)
    bases = [m for _, m in source_prompts()[:120]]
    batch1 = bases[:80]
    batch2 = bases[80:] + [edit(bases[i], "drop", rng) for i in range(0, 80, 8)]
    j1 = frame_of(batch1)
    j2 = frame_of(batch1 + batch2)  # curate passes parent + new judgments
    r1 = nd.run(j1, index_path=tmp_path / "missing")
    assert r1.metrics["prompts_hashed"] == 80 and "index_reset" not in r1.metrics
    names = nd.save_index(r1, tmp_path / "prompt_index")
    assert names == ["prompt_index.npz"] and not list(tmp_path.glob("*.tmp"))
    r2 = nd.run(j2, index_path=tmp_path / "prompt_index")
    assert r2.metrics["index_prompts_before"] == 80 and r2.metrics["prompts_hashed"] == len(batch2)
    one_shot = nd.run(j2)
    assert r2.tables["clusters"].equals(one_shot.tables["clusters"])
    assert r2.flags.sort("subject_id").equals(one_shot.flags.sort("subject_id"))
    assert r2.flags.height >= 18  # 10 edited copies and their originals (some may collide further)

    # a batch checked against the saved index only (earlier prompts not in the frame)
    idx = nd.PromptIndex.load(tmp_path / "prompt_index.npz")
    only_new = frame_of([edit(bases[3], "add", rng)])
    r3 = nd.run(only_new, index=idx)
    assert r3.flags.height == 1 and "earlier version" in r3.flags["detail"][0]
    assert r3.metrics["prompts_hashed"] == 1 and len(idx) == 81
    text5 = "\n".join(m["content"] for m in bases[5] if m["role"] != "system")
    hits = idx.query(texts=["Well, " + text5, "nothing like any prompt here"])
    assert hits["query"].to_list() == [0] and hits["key"][0] == j1["prompt_hash"][5] and hits["jaccard"][0] >= 0.7


def test_index_rejects_other_parameters_and_rechecks_threshold(tmp_path):
    texts = ["the cat sat on the mat today", "the cat sat on the mat", "completely different words here"]
    idx = nd.PromptIndex()
    idx.add(["k1", "k2", "k3"], texts)
    assert idx.edges.tolist() == [[0, 1]]
    path = idx.save(tmp_path / "ix.npz")
    with pytest.raises(ValueError, match="num_perm"):
        nd.PromptIndex.load(path, NearDuplicateConfig(num_perm=64))
    strict = nd.PromptIndex.load(path, NearDuplicateConfig(threshold=0.95, candidate_threshold=0.5))
    assert strict.edges.shape == (0, 2)
    again = nd.PromptIndex.load(path)
    assert np.array_equal(again.signatures, idx.signatures) and again.keys == idx.keys
    # run() starts afresh (and says so) when the saved index cannot be used
    res = nd.run(frame_of([[{"role": "user", "content": t}] for t in texts]), NearDuplicateConfig(num_perm=64),
                 index_path=path)
    assert "index_reset" in res.metrics and res.metrics["index_prompts_before"] == 0


def test_datasketch_storage_backend_gives_the_same_edges(tmp_path):
    rng = random.Random(7)
    bases = [m for _, m in source_prompts()[:100]]
    items = bases + [edit(bases[i], rng.choice(KINDS), rng) for i in range(0, 100, 4)]
    texts = ["\n".join(m["content"] for m in p) for p in items]
    keys = [f"k{i:04d}" for i in range(len(texts))]
    mem = nd.PromptIndex()
    ds = nd.PromptIndex(storage_config={"type": "dict"})
    for lo, hi in ((0, 60), (60, len(texts))):  # two increments
        mem.add(keys[lo:hi], texts[lo:hi])
        ds.add(keys[lo:hi], texts[lo:hi])
    assert mem.edge_frame().sort("left", "right").equals(ds.edge_frame().sort("left", "right"))
    assert mem.edges.shape[0] >= 20
    path = ds.save(tmp_path / "ds.npz")
    back = nd.PromptIndex.load(path, storage_config={"type": "dict"})  # a fresh storage is refilled
    q = back.query(texts=[texts[-1]])
    assert keys[-1] in q["key"].to_list()


# ---------------------------------------------------------------- edge cases
def test_empty_and_tiny_frames():
    empty = frame_of([])
    res = nd.run(empty)
    assert res.flags.height == 0 and res.tables["clusters"].height == 0 and res.metrics["pairs"] == 0
    one = frame_of([[{"role": "user", "content": "!!!"}]])
    res = nd.run(one)
    assert res.flags.height == 0 and res.tables["clusters"]["near_dup_cluster"].to_list() == [one["prompt_hash"][0]]
    # prompts without any word (punctuation / emoji only) are not near duplicates of each other
    res = nd.run(frame_of([[{"role": "user", "content": t}] for t in ("???", "!!!", "🙂🙂", "...")]))
    assert res.flags.height == 0


def test_system_prompt_shared_by_many_items_does_not_make_them_near_duplicates():
    system = {"role": "system", "content": "You are an AI assistant. User will give you a task. Your goal is to "
              "complete the task as faithfully as you can. While performing the task think step-by-step and "
              "justify your steps. Answer in a friendly tone and keep it short."}
    qs = ["When did Scotland qualify for the world cup?", "Generate a context and a hypothesis.",
          "What is the capital of Peru?", "Translate 'good night' into German."]
    res = nd.run(frame_of([[system, {"role": "user", "content": q}] for q in qs]))
    assert res.flags.height == 0


def test_config_rejects_candidate_threshold_above_threshold():
    with pytest.raises(ValueError, match="candidate_threshold"):
        NearDuplicateConfig(threshold=0.6, candidate_threshold=0.8)


@pytest.mark.parametrize("threshold,num_perm", [(0.5, 128), (0.7, 128), (0.3, 64), (0.8, 256), (0.55, 100)])
def test_band_parameters_equal_datasketch_optimum(threshold, num_perm):
    from datasketch.lsh import _optimal_param

    assert nd.optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)
