"""Language / locale check: planted mismatches found, clean multilingual data not flagged."""
from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import ROOT, canonical
from polars.testing import assert_frame_equal

from pipeline.checks import language
from pipeline.ingest import ingest_files, judgments_from_records
from schemas.policy import LanguageConfig

SHARED = ROOT.parent / "shared" / "data"
JA = "東京駅から京都駅までの新幹線の予約を変更したいのですが、オンラインで手続きできますか？出発は来週の金曜日です。"
ZH = "请问如何在不丢失数据的情况下把旧手机里的照片和联系人迁移到新手机上？我用的是安卓系统，新手机也是安卓。"
EN = "You can change the reservation online: open your booking, choose a new train and confirm the fare difference before you pay."


def _pair(i, locale, prompt, a, b):
    return canonical(i, locale=locale, prompt=prompt, response_a=a, response_b=b)


def test_samples_flag_exactly_the_planted_item():
    j = ingest_files(sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))).judgments
    res = language.run(j, LanguageConfig())
    planted = json.loads((ROOT / "data" / "samples" / "answer_key" / "planted.json").read_text())
    flagged = set(res.flags["subject_id"])
    mismatch_ids = set(j.filter(pl.col("extra").str.contains('"task_id":"task-0181"'))["pair_id"])
    assert flagged == mismatch_ids and len(flagged) == 1, (res.flags.to_dicts(), planted)
    assert res.metrics["matrix"]["ja-JP"]["ja"] > 0 and res.metrics["matrix"]["zh-CN"]["zh"] > 0


def test_clean_japanese_chinese_code_and_short_texts_not_flagged():
    code_ja = "次のコマンドを実行してください。\n```bash\npip install --upgrade requests urllib3 certifi idna\n```\n実行後、再起動してください。"
    rows = [
        _pair(0, "ja-JP", JA, "はい、予約の変更はオンラインで可能です。マイページから予約を選び、新しい列車を指定してください。", "できません。"),
        _pair(1, "zh-CN", ZH, "可以使用手机自带的迁移工具，把照片、联系人和短信一次性传到新手机。", "好的"),
        _pair(2, "ja-JP", "Pythonでリストをソートする方法を教えてください。", code_ja, "`sorted(xs)` を使います。"),
        _pair(3, "en", "What is 17 * 23?", "391", "17 * 23 = 391"),
        _pair(4, "ja-JP", "東京都の人口は？", "約1400万人です。", "1,400万人"),
        _pair(5, "en-US", "Translate 'thank you' to Japanese.", "ありがとう (arigatou)", EN),
    ]
    res = language.run(judgments_from_records(rows), LanguageConfig())
    assert res.flags.height == 0, res.flags.to_dicts()


@pytest.mark.parametrize(("locale", "prompt", "bad"), [("ja-JP", JA, EN), ("zh-CN", ZH, EN), ("en", "How do I change my train booking?", JA),
                                                       ("en", "How do I move my photos to a new phone?", ZH)])
def test_planted_mismatches_are_found(locale, prompt, bad):
    good = {"ja-JP": "はい、オンラインで変更できます。予約確認画面から新しい列車を選んでください。",
            "zh-CN": "可以的，在设置里找到数据迁移，按照提示操作即可把照片和联系人都转移过去。", "en": EN}[locale]
    res = language.run(judgments_from_records([_pair(0, locale, prompt, good, bad)]), LanguageConfig())
    assert res.flags["reason"].to_list() == ["language_mismatch"]
    assert "response_b" in res.flags["detail"][0]


def _read_one(text, head):
    """What ``profile`` counts for one text, read character by character in Python."""
    low = (text or "")[:head].lower()
    table = language._script_table()
    cls = [int(table[ord(ch)]) for ch in low]
    words, run = [], ""
    for ch, c in zip(low + "\0", [*cls, language.OTHER], strict=True):
        if c == language.LATIN:
            run += ch
        elif run:
            words.append(run)
            run = ""
    out = {"letters": sum(language.LATIN <= c <= language.LETTER for c in cls), "latin": cls.count(language.LATIN),
           "han": cls.count(language.HAN), "kana": cls.count(language.KANA), "hangul": cls.count(language.HANGUL),
           "code": cls.count(language.CODE), "words": len(words)}
    for lang, listed in language.STOPWORDS.items():
        stop = set(listed.split())
        out[f"w_{lang}"] = sum(w in stop for w in words)
    return out


def test_the_profile_counts_what_a_reading_of_each_text_counts():
    """The compiled profile (UTF-8 bytes of many texts at once, several chunks on threads) against a
    per-character reading: 1- to 4-byte characters, U+0130 (whose lower case is two code points),
    words at a text's end and at the cut, empty and missing texts, every script class."""
    import random

    rng = random.Random(7)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'") + list("{}[]()<>=;_|#$*`")
            + list("éèàçßøÆİıΣσςдЖяعבกनही日本語のテキストカタ한국어") + ["😀", "𠀀", "\u0307", "ǅ", "Ⅸ"]
            + " the and you der die und le la les el los que de het een il che".split(" "))
    texts = ["", None, "İstanbul THE and", "ΣΑΣ the", "the", "The the THE", "ab\u0130cd the", "İ" * 20 + "the",
             "x" * 30 + " the", "日本語のテキスト the and", "𠀀x the"]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(40_000)]
    for head in (24, 5):
        got = language.profile(pl.Series(texts, dtype=pl.String), head)
        cols = list(_read_one("", head))
        want = pl.DataFrame([_read_one(t, head) for t in texts], schema={k: pl.Int64 for k in cols})
        assert_frame_equal(got.select(cols).cast(pl.Int64), want)
        assert got["best"].to_list() == [max(r) for r in want.select(f"w_{x}" for x in language.WORD_LANGS).rows()]
    some = [t for t in texts[:3000] if t is not None]
    assert_frame_equal(language.profile(some, 24), language.profile(pl.Series(some, dtype=pl.String), 24))


@pytest.mark.skipif(not SHARED.exists(), reason="shared real data not present")
def test_real_data_false_flags_below_two_percent_and_recall():
    r = ingest_files([SHARED / "hh_harmless_test.jsonl", SHARED / "llamafactory_dpo_en.jsonl", SHARED / "llamafactory_dpo_zh.jsonl"])
    j = r.judgments
    res = language.run(j, LanguageConfig())
    assert res.flags.height / res.metrics["pairs_checked"] <= 0.02
    en = j.filter(pl.col("locale") == "en").head(150)
    zh = j.filter(pl.col("locale") == "zh").head(150)
    planted = pl.concat([en.with_columns(locale=pl.lit("zh-CN")), zh.with_columns(locale=pl.lit("en"))])
    res = language.run(planted, LanguageConfig())
    assert res.flags.height / planted["pair_id"].n_unique() >= 0.95
    again = language.run(planted, LanguageConfig())
    assert again.flags.equals(res.flags)  # deterministic (seeded langdetect)
