"""Certification: a clean sample version passes; a planted-problem version is rejected for the right reasons."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.certify import certify_version
from pipeline.curate import curate
from pipeline.store import Store
from schemas.policy import Policy, policy_from_dict

CLEAN = ROOT / "data" / "samples" / "batch-2026-11-02.jsonl"
runner = CliRunner()


def _planted_batch(tmp_path: Path) -> Path:
    """The clean batch plus: 10 % re-delivered duplicates, 8 % malformed lines, and an annotator
    who always picks the first-shown response on 80 pairs."""
    rng = random.Random(7)
    rows = [json.loads(line) for line in CLEAN.read_text(encoding="utf-8").splitlines()]
    out = list(rows)
    for i, r in enumerate(rng.sample(rows, len(rows) // 10)):
        out.append({**r, "comparison_id": f"redelivered-{i}"})
    pairs = {}
    for r in rows:
        pairs.setdefault(r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]), r)
    for i, r in enumerate(list(pairs.values())[:80]):
        shown = rng.choice("ab")
        out.append({**r, "comparison_id": f"biased-{i}", "annotator_id": "rev-biased", "annotator_kind": "human",
                    "shown_first": shown, "label": shown, "gold_label": None})
    lines = [json.dumps(r, ensure_ascii=False) for r in out]
    for i in range(len(lines) * 8 // 100):
        lines.insert(rng.randrange(len(lines)), '{"comparison_id": "broken-%d", "label": ' % i)
    p = tmp_path / "planted.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("certstore"))


def test_clean_sample_version_is_certified(store):
    res = curate([CLEAN], store, Policy())
    cert = certify_version(store, res.version_id, Policy())
    failing = {g.name: (g.value, g.threshold, g.detail) for g in cert.gates if not g.passed}
    assert cert.verdict == "certified", failing
    names = {g.name for g in cert.gates}
    assert {"integrity", "min_pairs.train", "krippendorff_alpha.human", "biased_annotator_share", "split_leakage",
            "quarantine_rate", "exact_duplicate_rate", "label_balance", "ai_share", "expectations"} <= names
    status = store.get(res.version_id).verify_chain()
    assert status.ok, status.reason
    gx_docs = list((store.root / "certifications" / res.version_id).rglob("index.html"))
    assert gx_docs, "Great Expectations Data Docs were not built beside the version"


def test_planted_version_rejected_with_reasons(store, tmp_path):
    policy = policy_from_dict({"select": {"flag_actions": {"low_reliability": "warn", "exact_duplicate": "warn"}}})
    res = curate([_planted_batch(tmp_path)], store, policy)
    cert = certify_version(store, res.version_id, policy, run_gx=False)
    failing = {g.name for g in cert.gates if not g.passed}
    assert cert.verdict == "rejected"
    assert {"quarantine_rate", "exact_duplicate_rate", "biased_annotator_share"} <= failing, failing
    bias = next(g for g in cert.gates if g.name == "biased_annotator_share")
    assert "rev-biased" in bias.detail
    # dropped by the version's policy: the gate passes, and says who was flagged and dropped ("flagged: none" before)
    dropping = policy_from_dict({"select": {"flag_actions": {"position_bias": "drop"}}})
    cert = certify_version(store, curate([_planted_batch(tmp_path)], store, dropping).version_id, dropping, run_gx=False)
    bias = next(g for g in cert.gates if g.name == "biased_annotator_share")
    assert bias.passed and bias.value == 0.0
    assert bias.detail == "flagged: none; flagged and dropped by the version's policy: rev-biased", bias.detail
    status = store.get(res.version_id).verify_chain()
    assert not status.ok and status.link == "verdict" and "quarantine_rate" in status.reason


def test_cli_exit_codes_history_and_tamper(store):
    vid = curate([CLEAN], store, Policy()).version_id
    res = runner.invoke(app, ["certify", vid, "--store", str(store.root), "--no-expectations",
                              "--policy", str(_policy_file(store.root, require_expectations=False))])
    assert res.exit_code == 0, res.output
    strict = _policy_file(store.root, min_pairs_per_split={"train": 100000, "validation": 1, "test": 1}, name="strict")
    res = runner.invoke(app, ["certify", vid, "--store", str(store.root), "--no-expectations", "--policy", str(strict)])
    assert res.exit_code == 3 and "min_pairs.train" in res.output and "REJECTED" in res.output
    hist = store.certification_history(vid)
    assert len(hist) >= 3 and hist[-1]["verdict"] == "rejected"  # history kept, newest last
    assert len({h["policy_hash"] for h in hist}) >= 2
    # a changed file: certify refuses (integrity gate) and the trainer check says why
    split = store.get(vid).split_files("test")[0]
    split.write_bytes(split.read_bytes() + b"\0")
    res = runner.invoke(app, ["certify", vid, "--store", str(store.root), "--no-expectations"])
    assert res.exit_code == 3 and "integrity" in res.output
    status = store.get(vid).verify_chain()
    assert not status.ok and status.link in ("verdict", "files")


def _policy_file(root: Path, name: str = "p", **certify) -> Path:
    p = root / f"{name}.json.toml"
    lines = ["[certify]"]
    for k, v in certify.items():
        if isinstance(v, dict):
            lines.append(f"{k} = {{ " + ", ".join(f'{kk} = {vv}' for kk, vv in v.items()) + " }")
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.slow
def test_cli_certify_with_relative_store_and_expectations(tmp_path, monkeypatch):
    """Great Expectations needs absolute paths: a relative --store must still work end to end."""
    monkeypatch.chdir(tmp_path)
    vid = curate([CLEAN], Store(Path("rel-store")), Policy()).version_id
    res = runner.invoke(app, ["certify", "latest", "--store", "rel-store"])
    assert res.exit_code == 0, res.output
    rec = Store(tmp_path / "rel-store").latest_certification(vid)
    assert rec["verdict"] == "certified"
    assert any(g["name"].startswith("expectations") and g["passed"] for g in rec["gates"]), rec["gates"]
    assert list((tmp_path / "rel-store" / "certifications").glob(f"{vid}/gx-*/data_docs/index.html"))


def test_skipping_required_expectations_cannot_certify(tmp_path):
    st = Store(tmp_path / "s")
    vid = curate([CLEAN], st, Policy()).version_id
    res = runner.invoke(app, ["certify", vid, "--store", str(st.root), "--no-expectations"])
    assert res.exit_code == 3 and "expectations" in res.output, res.output
    gate = [g for g in st.latest_certification(vid)["gates"] if g["name"] == "expectations"]
    assert gate and not gate[0]["passed"] and "not run" in gate[0]["detail"]


def _gate(cert, name):
    return next(g for g in cert.gates if g.name == name)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A store with the clean sample version, left as written (``store`` gets a file changed by a test above)."""
    st = Store(tmp_path_factory.mktemp("clean"))
    return st, curate([CLEAN], st, Policy()).version_id


def test_gate_verdict_matches_the_recorded_value_at_its_threshold(clean):
    """A threshold set to the value a certificate shows passes (>= and the interval's ends are inclusive), and one
    just beyond it fails: the value recorded is the value compared (a rounded 0.4413 for alpha 0.44128 failed a
    threshold of 0.4413 while the record read 0.4413 >= 0.4413)."""
    store, vid = clean
    opt = {"require_expectations": False}
    base = certify_version(store, vid, policy_from_dict({"certify": opt}), run_gx=False)
    alpha, share = _gate(base, "krippendorff_alpha.human").value, _gate(base, "label_balance").value
    assert isinstance(alpha, float) and isinstance(share, float)
    at = certify_version(store, vid, policy_from_dict({"certify": {**opt, "min_krippendorff_alpha": alpha,
                                                                   "label_balance": [share, share]}}), run_gx=False)
    for name, value, threshold in (("krippendorff_alpha.human", alpha, alpha), ("label_balance", share, [share, share])):
        g = _gate(at, name)
        assert g.passed and g.value == value and g.threshold == threshold, g
    above = certify_version(store, vid, policy_from_dict({"certify": {**opt, "min_krippendorff_alpha": alpha + 1e-9,
                                                                      "label_balance": [share + 1e-9, 1.0]}}), run_gx=False)
    assert not _gate(above, "krippendorff_alpha.human").passed and not _gate(above, "label_balance").passed


def test_no_kept_pairs_fails_the_share_gates(tmp_path):
    """Every pair dropped (too long for max_tokens_per_pair) under a policy that asks for no minimum: the label
    balance and AI share were not measured, so they fail -- they passed on made-up values (0.5, 0.0) and such a
    version was certified with nothing to train on."""
    st = Store(tmp_path / "s")
    pol = policy_from_dict({"select": {"max_tokens_per_pair": 16}, "certify": {
        "require_expectations": False, "require_agreement": False, "min_pairs_per_split": {"train": 0, "validation": 0, "test": 0}}})
    vid = curate([CLEAN], st, pol).version_id
    cert = certify_version(st, vid, pol, run_gx=False)
    assert sum(_gate(cert, f"min_pairs.{s}").value for s in ("train", "validation", "test")) == 0
    assert cert.verdict == "rejected"
    for name in ("label_balance", "ai_share"):
        g = _gate(cert, name)
        assert not g.passed and g.value is None and "not measured" in g.detail, g


def test_expectations_fail_a_planted_defect_and_data_docs_escape_it(clean, tmp_path):
    """The GX suite run on a version's split with planted defects (an annotator kind that is a <script>, a weight
    of 0, a repeated pair id) fails exactly those expectations, passes on the clean split, and the Data Docs show
    the unexpected values as text: GX put them into the page as they were."""
    import polars as pl

    from pipeline.expectations import run_expectations

    store, vid = clean
    clean = store.get(vid).read_split("train")
    row = pl.int_range(pl.len())
    bad = clean.with_columns(
        annotator_kind=pl.when(row == 0).then(pl.lit("<script>alert('kind')</script>")).otherwise("annotator_kind"),
        weight=pl.when(row == 1).then(0.0).otherwise("weight"),
        pair_id=pl.when(row == 2).then(pl.lit('<img src=x onerror="alert(1)">')).otherwise("pair_id"))
    bad = pl.concat([bad, bad.slice(2, 1)])
    out = tmp_path / "gx"
    res = run_expectations({"train": clean, "bad": bad}, out)
    assert res["splits"]["train"]["success"] and not res["splits"]["train"]["failed"]
    assert sorted(res["splits"]["bad"]["failed"]) == ["expect_column_values_to_be_between(weight)",
                                                      "expect_column_values_to_be_in_set(annotator_kind)",
                                                      "expect_column_values_to_be_unique(pair_id)"]
    pages = [p.read_text(encoding="utf-8") for p in (out / "data_docs").rglob("*.html")]
    assert any("&lt;script&gt;alert(" in t for t in pages), "the unexpected annotator kind is not shown"
    assert not any("<script>alert(" in t or "<img src=x" in t for t in pages), "Data Docs render a value as HTML"


def test_cli_json_says_ok_and_exit_code_either_way(clean, tmp_path):
    """--json on a certified version carries ok: true and exit_code 0, as a rejection carries ok: false and 3 (it
    carried neither: a reader testing doc["ok"] failed on the one outcome it wanted)."""
    store, vid = clean
    lenient = _policy_file(tmp_path, require_expectations=False)
    res = runner.invoke(app, ["certify", vid, "--store", str(store.root), "--policy", str(lenient), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"] is True and doc["exit_code"] == 0 and doc["verdict"] == "certified"
    assert {"gates", "policy_hash", "manifest_sha256", "record", "opt_outs"} <= set(doc) and doc["opt_outs"] == ["expectations"]
    strict = _policy_file(tmp_path, name="strict", require_expectations=False, min_pairs_per_locale=10**6)
    res = runner.invoke(app, ["certify", vid, "--store", str(store.root), "--policy", str(strict), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 3 and doc["ok"] is False and doc["exit_code"] == 3 and doc["verdict"] == "rejected"
    assert all(g["name"].startswith("min_pairs.locale=") for g in doc["gates"] if not g["passed"])


def test_qualified_overlap_fails_a_kept_locale_its_sums_do_not_hold(tmp_path):
    """A locale of the kept pairs that the qualified-overlap sums have no entry for (no judgment of it counted)
    fails its gate: it needed min(share x 0 pairs, cap) = 0 overlap pairs and passed with none."""
    from pipeline.certify import qualified_overlap_gates
    from pipeline.certify_parts import full_agreement_state
    from schemas.registry import load_registry

    st = Store(tmp_path / "s")
    pol = Policy(annotators=load_registry(ROOT / "data" / "samples" / "annotators.csv"))
    h = st.get(curate([CLEAN], st, pol).version_id)
    state = full_agreement_state(h)
    assert "fr-FR" not in state["qualified"] and "en" in state["qualified"]
    gates = {g.name: g for g in qualified_overlap_gates(h, Policy().certify, locales={"en", "fr-FR"}, state=(state, ""))}
    fr = gates["qualified_overlap.locale=fr-FR"]
    assert (fr.value, fr.threshold, fr.passed) == (0, 1, False), fr
    assert gates["qualified_overlap.locale=en"].passed


def _gc_json(store_root: Path, *versions: str) -> dict:
    args = ["gc", "--store", str(store_root), "--apply", "--json"]
    for v in versions:
        args += ["--delete", v]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_gc_keeps_a_version_and_its_parent_while_certify_reads_them(tmp_path, monkeypatch):
    """`prefpipe gc --delete V --apply` run while `prefpipe certify V` is reading V (paused inside its gates, gc in a
    thread of its own) keeps V and its parent (both listed in_use), and certify completes with its record: certify
    took no hold, so gc removed the version under it (a traceback, or a record written for a version gone)."""
    import threading

    import pipeline.certify as certify_mod

    st = Store(tmp_path / "s")
    parent = curate([CLEAN], st, Policy()).version_id
    child = curate([ROOT / "data" / "samples" / "batch-2026-11-09.jsonl"], st, Policy(), parent=parent).version_id
    seen: list[dict] = []
    gates = certify_mod.evaluate_gates

    def paused(*args, **kwargs):  # certify is inside its gates, having read the manifest and hashed every file
        t = threading.Thread(target=lambda: seen.append(_gc_json(st.root, child, parent)))
        t.start()
        t.join(120)
        return gates(*args, **kwargs)

    monkeypatch.setattr(certify_mod, "evaluate_gates", paused)
    lenient = policy_from_dict({"certify": {"require_expectations": False}})
    cert = certify_version(st, child, lenient, run_gx=False)
    assert seen and seen[0]["versions"] == [] and sorted(seen[0]["in_use"]) == sorted([child, parent]), seen
    assert st.exists(child) and st.exists(parent)
    assert _gate(cert, "integrity").passed and len(cert.gates) > 10  # every gate evaluated on the files as published
    rec = st.latest_certification(child)
    assert rec["verdict"] == cert.verdict and rec["manifest_sha256"] == st.get(child).manifest_sha256()
    # once certify is done, gc removes them
    monkeypatch.undo()
    done = _gc_json(st.root, child, parent)
    assert sorted(done["versions"]) == sorted([child, parent]) and done["in_use"] == []


def test_certify_of_a_version_removed_before_its_hold_exits_2(tmp_path, monkeypatch):
    """A version gc removes between certify's lookup and its hold: exit 2 saying so, and no record written (certify
    went on reading files that were gone)."""
    from pipeline.parts import collect_garbage, plan_gc

    st = Store(tmp_path / "s")
    vid = curate([CLEAN], st, Policy()).version_id
    hold = Store.in_use

    def gc_first(self, version_id):
        if version_id == vid and self.exists(vid):
            collect_garbage(self, plan_gc(self, delete_versions=[vid]))
        return hold(self, version_id)

    monkeypatch.setattr(Store, "in_use", gc_first)
    res = runner.invoke(app, ["certify", vid, "--store", str(st.root), "--no-expectations", "--json"])
    assert res.exit_code == 2, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and f"version {vid} was removed" in doc["error"], doc
    assert not st.exists(vid) and not st.certification_path(vid).exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_docs_failing_mid_write_leave_the_previous_folder_intact(clean, tmp_path, monkeypatch):
    """A GX run that fails after it wrote part of its folder (a batch that cannot be read after the first was
    validated; the summary's write failing after the Data Docs were built) leaves the previous results and Data Docs
    as they were, or no folder when there was none, and nothing half-written beside them: GX wrote straight into
    the folder (validation_train.json and the site replaced, the summary the old one)."""
    import pipeline.expectations as ex

    store, vid = clean
    train = store.get(vid).read_split("train")
    out = tmp_path / "gx"

    def unreadable():
        raise OSError(5, "Input/output error", "part-x.parquet")

    with pytest.raises(OSError):  # a first run failing: no folder at all
        ex.run_expectations({"train": train.head(5), "bad": unreadable}, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    first = ex.run_expectations({"train": train}, out)
    assert first["success"] and Path(first["docs_index"]) == out.resolve() / "data_docs" / "index.html"
    before = _tree(out)
    assert "summary.json" in before and "validation_train.json" in before and "data_docs/index.html" in before
    with pytest.raises(OSError):
        ex.run_expectations({"train": train.head(5), "bad": unreadable}, out)
    assert _tree(out) == before
    write = ex.atomic_write_bytes

    def full_disk(path, data):
        if path.name == "summary.json":
            raise OSError(28, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(ex, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError):
        ex.run_expectations({"train": train.head(5)}, out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gx"]  # no staging folder left beside it


def test_two_gx_runs_into_one_folder_never_mix_their_files(clean, tmp_path, monkeypatch):
    """Two certifications writing one version's GX folder at once (one paused after its first file while the other
    runs to the end): the folder is one run's, whole -- the files of both were mixed in it (the other's validation
    results and Data Docs pages beside a summary that does not list them).  Run through the store's staging
    directory, as certify does: the stage is marked as its writer's, and gone afterwards."""
    import threading

    import pipeline.expectations as ex

    store, vid = clean
    train = store.get(vid).read_split("train")
    out = tmp_path / "certifications" / vid / "gx-test"
    staging = tmp_path / ".staging"
    wrote, go = threading.Event(), threading.Event()
    write = ex.atomic_write_bytes

    def pausing(path, data):
        write(path, data)
        if threading.current_thread().name == "first" and path.name.startswith("validation_"):
            stages = [p for p in staging.iterdir() if not p.name.endswith(".alive")]
            assert len(stages) == 1 and (stages[0].parent / (stages[0].name + ".alive")).exists(), stages
            wrote.set()
            go.wait(120)

    monkeypatch.setattr(ex, "atomic_write_bytes", pausing)
    errors: list[BaseException] = []

    def first():
        try:
            ex.run_expectations({"first": train.head(20)}, out, staging=staging)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            wrote.set()

    t = threading.Thread(target=first, name="first")
    t.start()
    assert wrote.wait(120)
    second = ex.run_expectations({"second": train}, out, staging=staging)  # runs to the end while the first waits
    assert second["success"] and sorted(p.name for p in out.glob("validation_*.json")) == ["validation_second.json"]
    go.set()
    t.join(120)
    assert not errors, errors
    files = _tree(out)
    assert sorted(n for n in files if n.startswith("validation_")) == ["validation_first.json"], sorted(files)
    assert list(json.loads(files["summary.json"])["splits"]) == ["first"]
    pages = [n for n in files if n.startswith("data_docs/validations/") and n.endswith(".html")]
    assert len(pages) == 1, pages  # the site of one run: one validation page
    assert list(staging.iterdir()) == [] and [p.name for p in out.parent.iterdir()] == ["gx-test"]


def test_a_replaced_folder_left_by_a_writer_that_died_is_swept(tmp_path, monkeypatch):
    """The old Data Docs folder goes aside into the store's .staging/ (named with its writer's pid), not beside the
    new one: a writer that dies before removing it leaves it where a sweep finds it once the writer is gone."""
    import pipeline.store as store_mod

    target, staging = tmp_path / "certifications" / "v-x" / "gx-1", tmp_path / ".staging"
    for d, text in ((target, "old"), (staging / "new", "new")):
        d.mkdir(parents=True)
        (d / "summary.json").write_text(text)
    monkeypatch.setattr(store_mod.shutil, "rmtree", lambda *a, **k: None)  # (dies before removing the old one)
    store_mod.replace_dir(staging / "new", target, aside_in=staging)
    assert (target / "summary.json").read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["gx-1"]
    old = [p for p in staging.iterdir()]
    assert len(old) == 1 and (old[0] / "summary.json").read_text() == "old"
    assert store_mod.dead_stages(staging) == []  # its writer (this process) lives
    monkeypatch.setattr(store_mod, "_pid_alive", lambda pid: False)
    assert store_mod.dead_stages(staging) == old
