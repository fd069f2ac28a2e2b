"""Language / locale check: planted mismatches found, clean multilingual data not flagged."""
from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import ROOT, canonical

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
