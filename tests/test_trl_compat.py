"""A built version's splits load as they are into `datasets` and TRL's DPO data preparation
(issue 5 item 7), and read the same in polars, pandas and duckdb.

TRL (1.16.0) prepares preference data in ``DPOTrainer._prepare_dataset``: ``is_conversational``
decides the path, then each row is tokenised with the tokenizer's chat template
(``prompt`` with the generation prompt, ``prompt + chosen``, ``prompt + rejected``) and the
completion ids are what follows the shared prefix.  We run that method itself on the parquet
split loaded with ``datasets.load_dataset("parquet", ...)``: no conversion in between.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import polars as pl
import pytest
from conftest import ROOT

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from trl.data_utils import is_conversational, maybe_apply_chat_template  # noqa: E402  (imports torch: ~10 s)
from pipeline.curate import curate  # noqa: E402
from pipeline.store import SPLITS, Store  # noqa: E402
from schemas.policy import Policy  # noqa: E402

SAMPLES = ROOT / "data" / "samples"
TOKENIZER = ROOT / "trainer" / "assets" / "tiny-chat-tokenizer"
STRING = {"string", "large_string"}  # polars writes Arrow large_string; `datasets` keeps it


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("trl") / "store")
    res = curate(sorted(SAMPLES.glob("batch-*.jsonl")), store, Policy())
    return res.handle


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert tok.chat_template, "the tiny tokenizer has no chat template"
    return tok


@pytest.fixture(scope="module")
def dataset(version, tmp_path_factory):
    # a split is a folder of Parquet parts: HF datasets takes a glob (docs/input-format.md, "reading a version")
    files = {s: f"{version.split_path(s)}/*.parquet" for s in SPLITS}
    return datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path_factory.mktemp("hf-cache")))


def _message_fields(feature) -> dict[str, str]:
    """{field: dtype} of a `datasets` feature that is a list (List or LargeList) of structs."""
    inner = feature.feature if hasattr(feature, "feature") else feature[0]
    return {k: v.dtype for k, v in inner.items()}


def test_load_dataset_features_are_trl_conversational(dataset, version):
    m = version.manifest()
    assert {s: dataset[s].num_rows for s in SPLITS} == {s: m.splits[s].rows for s in SPLITS}
    feats = dataset["train"].features
    for col in ("prompt", "chosen", "rejected"):
        fields = _message_fields(feats[col])
        assert set(fields) == {"role", "content"} and set(fields.values()) <= STRING, (col, feats[col])
    assert feats["weight"].dtype == "float64" and feats["pair_id"].dtype in STRING
    for s in SPLITS:
        for row in dataset[s]:
            assert is_conversational(row)
            assert row["prompt"][-1]["role"] == "user"
            assert [t["role"] for t in row["chosen"]] == [t["role"] for t in row["rejected"]] == ["assistant"]
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_trl_chat_template_and_dpo_preparation_without_conversion(dataset, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    train = dataset["train"]
    for row in train.select(range(min(20, train.num_rows))):
        out = maybe_apply_chat_template(row, tokenizer)
        assert out["prompt"].endswith("<|im_start|>assistant\n")
        assert out["prompt"].count("<|im_start|>user") == sum(t["role"] == "user" for t in row["prompt"])
        assert out["chosen"] == row["chosen"][0]["content"] + "<|im_end|>\n"
        assert out["rejected"] == row["rejected"][0]["content"] + "<|im_end|>\n"

    # DPOTrainer's own preparation (only ``_tokenizer`` of the trainer is used, for non-conversational data)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, save_strategy="no", max_length=None)
    trainer_stub = SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer_stub, train, tokenizer, args, "train")
    assert prepared.num_rows == train.num_rows
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(prepared.column_names)
    for row, prep in zip(train, prepared):
        assert prep["pair_id"] == row["pair_id"]
        assert prep["prompt_ids"] and prep["chosen_ids"] and prep["rejected_ids"]
        whole = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
        assert prep["prompt_ids"] + prep["chosen_ids"] == whole
        chosen_text = tokenizer.decode(prep["chosen_ids"])
        assert row["chosen"][0]["content"] in chosen_text and chosen_text.endswith("<|im_end|>\n")


def test_polars_pandas_duckdb_read_the_same(version, dataset):
    import duckdb
    import pandas as pd

    for s in SPLITS:
        path = version.split_path(s)
        p = pl.read_parquet(path)
        pdf = pd.read_parquet(path)
        con = duckdb.connect()
        glob = f"{path}/*.parquet"
        duck_cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [glob]).fetchall()]
        duck = con.execute("SELECT pair_id, weight, prompt, chosen, rejected, source_comparison_ids "
                           "FROM read_parquet(?)", [glob]).fetchall()
        assert p.columns == list(pdf.columns) == duck_cols == dataset[s].column_names
        assert p.height == len(pdf) == len(duck) == version.manifest().splits[s].rows
        assert p["pair_id"].to_list() == pdf["pair_id"].tolist() == [r[0] for r in duck] == dataset[s]["pair_id"]
        assert p["weight"].to_list() == pdf["weight"].tolist() == [r[1] for r in duck]
        want = p.select("prompt", "chosen", "rejected", "source_comparison_ids").to_dicts()
        got_duck = [dict(zip(("prompt", "chosen", "rejected", "source_comparison_ids"), r[2:])) for r in duck]
        assert got_duck == want
        got_pd = [{k: _plain(r[k]) for k in want[0]} for r in pdf.to_dict("records")] if want else []
        assert got_pd == want
        assert [{k: r[k] for k in want[0]} for r in dataset[s]] == want if want else True


def _plain(v):
    """pandas (pyarrow engine) gives numpy arrays of dicts for list columns; make them lists."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory):
    """A version too small for a validation or test pair: both splits are empty (one zero-row part each)."""
    from conftest import canonical, write_jsonl

    d = tmp_path_factory.mktemp("tiny")
    h = curate([write_jsonl(d / "tiny.jsonl", [canonical(i) for i in range(3)])], Store(d / "store"), Policy()).handle
    assert {s: h.manifest().splits[s].rows for s in SPLITS} == {"train": 3, "validation": 0, "test": 0}
    return h


def test_an_empty_split_reads_with_its_columns_and_datasets_loads_it_as_the_readme_says(tiny_version, tmp_path):
    """README ("A split folder reads as one table everywhere"): Polars, pandas and DuckDB read an empty split
    with every column; `datasets` refuses a DatasetDict with an empty split whatever the file holds (its
    reader skips a split of 0 examples: "corresponds to no data"; one empty row group instead of none breaks
    its Parquet reader too, batch_size 0), so the README says to load the splits one by one or stream them.
    When `datasets` loads it, this test fails: drop the limit from the README."""
    import duckdb
    import pandas as pd

    files = {s: f"{tiny_version.split_path(s)}/*.parquet" for s in SPLITS}
    train = pl.read_parquet(tiny_version.split_path("train"))
    empty = tiny_version.split_path("validation")
    assert pl.read_parquet(empty).schema == train.schema and list(pd.read_parquet(empty).columns) == train.columns
    assert duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)", [files["validation"]]).fetchone() == (0,)
    cache = str(tmp_path / "hf-cache")
    with pytest.raises(ValueError, match='"validation" corresponds to no data'):
        datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
    assert datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache).num_rows == 3
    streamed = datasets.load_dataset("parquet", data_files=files, streaming=True)["validation"]
    assert list(streamed) == [] and list(streamed.features) == train.columns
