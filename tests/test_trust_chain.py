"""The certificate means what it says: certificate -> manifest -> files, tampering in every link,
signatures, and a broken store (damaged manifest, orphan folder, disk full, read-only, kill -9)
that ends in a clear exit code instead of a traceback or a wrong "certified"."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from flows.cli import app
from pipeline.certify import certify_version
from pipeline.curate import curate
from pipeline.signing import SigningConfigError
from pipeline.store import NotCertified, Store, sha256_file, table_sha256
from schemas.manifest import SplitInfo
from schemas.policy import policy_from_dict

SAMPLES = sorted((ROOT / "data" / "samples").glob("batch-*.jsonl"))
POLICY = policy_from_dict({"certify": {"require_expectations": False}})
runner = CliRunner()


def cli(*args: str):
    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), f"traceback: {res.exception!r}\n{res.output}"
    assert "Traceback" not in res.output
    return res


def policy_file(root: Path) -> Path:
    p = root / "policy.toml"
    p.write_text("[certify]\nrequire_expectations = false\n")
    return p


def certified_store(root: Path, batches=SAMPLES[:1]) -> tuple[Store, str]:
    st = Store(root)
    vid = curate(batches, st, POLICY).version_id
    cert = certify_version(st, vid, POLICY, run_gx=False)
    assert cert.verdict == "certified", [g for g in cert.gates if not g.passed]
    return st, vid


@pytest.fixture
def store(tmp_path):
    return certified_store(tmp_path / "store")


def rewrite_manifest(st: Store, vid: str, edit) -> None:
    p = st.versions_dir / vid / "manifest.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc, indent=2))


# ---------------------------------------------------------------- the chain holds, and each link can break
def test_certified_version_verifies_whole_chain(store):
    st, vid = store
    status = st.get(vid).verify_chain()
    assert status.ok and status.link is None
    rec = st.latest_certification(vid)
    assert rec["manifest_sha256"] == sha256_file(st.versions_dir / vid / "manifest.json")
    from pipeline.checks import resolve_policy

    assert rec["policy_hash"] == resolve_policy(POLICY).policy_hash()
    assert st.open_certified(vid).version_id == vid


def swap_labels_and_rewrite_manifest(st: Store, vid: str) -> None:
    """Swap chosen/rejected in a train part and write its new sha256 into the manifest: the files match the manifest."""
    path = st.get(vid).split_files("train")[0]
    df = pl.read_parquet(path)
    path.unlink()  # (a hard link to the shared object: write a new file, as an editor would)
    df.with_columns(chosen=df["rejected"], rejected=df["chosen"]).write_parquet(path)

    def fix(doc):
        table = doc["tables"]["data/train"]
        part = next(p for p in table["parts"] if st.versions_dir / vid / p["path"] == path)
        part.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        table["sha256"] = doc["splits"]["train"]["sha256"] = table_sha256([SplitInfo(**p) for p in table["parts"]])

    rewrite_manifest(st, vid, fix)
    assert Store(st.root).get(vid).verify() == []  # the files match the (rewritten) manifest ...


def train_refused(st, vid, link):
    """The chain of ``vid`` broken at ``link``: ``open_certified`` and ``prefpipe train`` (exit 4) refuse it there."""
    status = Store(st.root).get(vid).verify_chain()
    assert not status.ok and status.link == link
    with pytest.raises(NotCertified) as err:
        Store(st.root).open_certified(vid)
    assert err.value.link == link
    res = cli("train", vid, "--store", str(st.root), "--model", "tiny-llama:layers=1,hidden=32,heads=2", "--steps", "1")
    assert res.exit_code == 4 and f"{link} link broken" in res.output
    return status


def test_swapped_labels_with_rewritten_manifest_sha_is_not_certified(store, tmp_path):
    """The attack of the issue: swap chosen/rejected in train.parquet, write the new sha256 into the manifest."""
    st, vid = store
    swap_labels_and_rewrite_manifest(st, vid)
    assert "changed after certification" in train_refused(st, vid, "manifest").reason
    assert not (st.root / "runs").exists()
    shown = json.loads(cli("show", vid, "--store", str(st.root), "--json").stdout)
    assert shown["trust"]["ok"] is False and shown["trust"]["link"] == "manifest"
    listed = json.loads(cli("versions", "--store", str(st.root), "--json").stdout)
    assert listed[0]["certified"] is False and listed[0]["trust"]["link"] == "manifest"


def test_an_uncertified_version_rewritten_after_publication_is_refused_by_certify(tmp_path):
    """The same edit before anyone certified the version: no certificate bound the manifest, the files match it,
    the id is the same.  Certify certified the swapped labels (exit 0) and versions/show/train trusted them; now the
    integrity gate compares the manifest with the one the store published."""
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    swap_labels_and_rewrite_manifest(st, vid)
    pol = str(policy_file(st.root))
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", pol)
    out = " ".join(res.stdout.split())  # (the console wraps long lines)
    assert res.exit_code == 3 and f"REJECTED {vid}: failing gates: integrity" in out, res.output
    assert f"not the manifest the store published as {vid}" in out and "rewritten after publication" in out
    doc = json.loads(cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", pol, "--json").stdout)
    assert doc["ok"] is False and doc["exit_code"] == 3 and [g["name"] for g in doc["gates"]] == ["integrity"]
    assert "not the manifest the store published" in doc["gates"][0]["detail"]
    assert st.get(vid).verify_chain().link == "verdict"
    # a record that certified the rewritten manifest (written by a prefpipe from before publication records, or by
    # hand without a signing key): the chain breaks at the publication link
    rejected = certify_version(st, vid, POLICY, run_gx=False)
    assert rejected.manifest_sha256 == sha256_file(st.versions_dir / vid / "manifest.json")
    st.add_certification(rejected.model_copy(update={"verdict": "certified"}))
    assert "rewritten after publication" in train_refused(st, vid, "publication").reason
    listed = json.loads(cli("versions", "--store", str(st.root), "--json").stdout)
    assert listed[0]["certified"] is False and listed[0]["trust"]["link"] == "publication"


def test_a_version_from_before_publication_records_certifies_and_says_so(tmp_path):
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    shutil.rmtree(st.root / ".index" / "published")
    cert = certify_version(st, vid, POLICY, run_gx=False)
    integrity = next(g for g in cert.gates if g.name == "integrity")
    assert cert.verdict == "certified" and f"no publication record of {vid}" in integrity.detail
    status = st.get(vid).verify_chain()
    assert status.ok and f"no publication record of {vid}" in status.reason
    assert st.open_certified(vid).version_id == vid


def test_changed_file_breaks_the_files_link(store):
    st, vid = store
    path = st.get(vid).split_files("test")[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "files" and "data/test/part-" in status.reason
    assert st.get(vid).verify_chain(files=False).ok  # the fast listing does not hash: it says so in its help
    listed = json.loads(cli("versions", "--store", str(st.root), "--json").stdout)
    assert listed[0]["certified"] is False and listed[0]["trust"]["link"] == "files"


def test_manifest_naming_a_file_outside_the_version_is_refused(store, tmp_path):
    """A manifest path is joined onto the version folder only when it stays inside it: a part named
    ``../../../outside.parquet`` (or ``/abs/...``) is an integrity problem even when the file it names
    has the listed sha256 (certify would otherwise hash whatever it names: another store's files,
    a FIFO, /dev/zero)."""
    st, vid = store
    h = st.get(vid)
    outside = tmp_path / "outside.parquet"
    shutil.copy(h.split_files("train")[0], outside)
    for name in (os.path.relpath(outside, h.path), str(outside)):
        def fix(doc, name=name):
            table = doc["tables"]["data/train"]
            table["parts"][0]["path"] = name
            table["sha256"] = doc["splits"]["train"]["sha256"] = table_sha256([SplitInfo(**p) for p in table["parts"]])

        rewrite_manifest(st, vid, fix)
        fresh = Store(st.root).get(vid)
        assert any("not a path inside the version" in p for p in fresh.verify()), (name, fresh.verify())
        from pipeline.store import IntegrityError

        with pytest.raises(IntegrityError, match="not a path inside the version"):
            fresh.read_split("train")
        cert = certify_version(Store(st.root), vid, POLICY, run_gx=False)
        assert cert.verdict == "rejected" and not cert.gates[0].passed and cert.gates[0].name == "integrity", name


def test_verified_read_refuses_a_file_changed_after_open(store):
    st, vid = store
    h = st.open_certified(vid)
    path = st.get(vid).split_files("validation")[0]
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # swapped between the check and the read
    from pipeline.store import IntegrityError

    with pytest.raises(IntegrityError, match="validation/part-.*: sha256 differs"):
        h.read_split("validation")


def test_published_report_md_is_verified_against_the_manifest(store):
    """The Prefect markdown artifact is the version's report.md only when its bytes match the
    manifest's sha256: a report.md edited in the store (a forged verdict, raw HTML) is refused."""
    from pipeline.artifacts import report_markdown
    from pipeline.store import IntegrityError

    st, vid = store
    h = st.get(vid)
    original = h.file("report.md").read_text(encoding="utf-8")
    assert report_markdown(h, "summary") == original
    h.file("report.md").write_text(original + "\n**CERTIFIED** <script>alert(1)</script>\n", encoding="utf-8")
    with pytest.raises(IntegrityError, match="report.md: sha256 differs from the manifest"):
        report_markdown(st.get(vid), "summary")


def test_certificate_copied_from_another_version_is_refused(tmp_path):
    st, a = certified_store(tmp_path / "s", SAMPLES[:1])
    b = curate(SAMPLES[1:2], st, POLICY).version_id
    shutil.copy(st.certification_path(a), st.certification_path(b))  # copied and renamed
    status = st.get(b).verify_chain()
    assert not status.ok and status.link == "certificate" and a in status.reason
    doc = json.loads(st.certification_path(b).read_text())  # ... and edited to name b
    for rec in doc["history"]:
        rec["version_id"] = b
    st.certification_path(b).write_text(json.dumps(doc))
    status = st.get(b).verify_chain()
    assert not status.ok and status.link == "manifest"
    assert cli("train", b, "--store", str(st.root), "--steps", "1").exit_code == 4


def test_record_without_manifest_hash_is_not_a_certification(store):
    st, vid = store
    p = st.certification_path(vid)
    doc = json.loads(p.read_text())
    for rec in doc["history"]:
        rec.pop("manifest_sha256")
    p.write_text(json.dumps(doc))
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "manifest" and "does not bind a manifest" in status.reason


def test_damaged_certification_record_is_reported_and_replaced(store):
    st, vid = store
    st.certification_path(vid).write_text('{"history": [')
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "certificate" and "damaged certification record" in status.reason
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(st.root)))
    assert res.exit_code == 0, res.output
    assert st.get(vid).verify_chain().ok
    assert list(st.certification_path(vid).parent.glob(f"{vid}.json.damaged-*"))  # kept aside, not lost


def test_show_and_versions_report_a_damaged_certification_record(store):
    """A damaged record is a broken certificate link, not a broken version: show prints the whole
    version and says "NOT certified (certificate)" (exit 0; --json: trust names the link), and
    versions does not pass it off as "never certified"."""
    st, vid = store
    st.certification_path(vid).write_text('{"history": [')
    res = cli("show", vid, "--store", str(st.root))
    assert res.exit_code == 0, res.output
    shown = " ".join(res.stdout.split())  # (the console wraps long lines)
    assert "NOT certified (certificate)" in shown and "damaged certification record" in shown
    res = cli("show", vid, "--store", str(st.root), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["certification"] is None and doc["trust"]["link"] == "certificate"
    assert "damaged certification record" in doc["trust"]["reason"]
    res = cli("versions", "--store", str(st.root))
    assert res.exit_code == 0 and "damaged" in res.output, res.output
    assert json.loads(cli("versions", "--store", str(st.root), "--json").stdout)[0]["certified"] is False


# ---------------------------------------------------------------- signatures
def test_hmac_signed_records(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY", "k" * 32)
    st, vid = certified_store(tmp_path / "s")
    rec = st.latest_certification(vid)
    assert rec["signature_alg"] == "hmac-sha256" and rec["signature"]
    assert st.get(vid).verify_chain().ok
    # an edited record (a failing gate turned into a pass) no longer verifies
    p = st.certification_path(vid)
    doc = json.loads(p.read_text())
    doc["history"][-1]["certified_at"] = "2030-01-01T00:00:00Z"
    p.write_text(json.dumps(doc))
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "signature" and "edited after signing" in status.reason
    # another key
    certify_version(st, vid, POLICY, run_gx=False)
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY", "x" * 32)
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "signature" and "another key" in status.reason
    res = cli("train", vid, "--store", str(st.root), "--steps", "1")
    assert res.exit_code == 4 and "signature" in res.output


def test_unsigned_record_refused_when_signing_is_configured(store, monkeypatch):
    st, vid = store
    assert st.get(vid).verify_chain().ok
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY", "k" * 32)
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "signature" and "not signed" in status.reason


def test_short_secret_is_a_usage_error(store, monkeypatch):
    st, vid = store
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY", "short")
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations")
    assert res.exit_code == 2 and "at least 16" in res.output


@pytest.mark.parametrize("var", ["PREFPIPE_SIGNING_KEY", "PREFPIPE_SIGNING_KEY_FILE", "PREFPIPE_VERIFY_KEY_FILE"])
def test_empty_key_variable_is_a_usage_error_not_signing_off(store, monkeypatch, var):
    """A key that failed to arrive must not switch verification off: an unsigned (forgeable) record
    would then count as a certification on a machine configured to verify signatures."""
    st, vid = store
    monkeypatch.setenv(var, "")
    res = cli("versions", "--store", str(st.root))
    assert res.exit_code == 2 and var in res.output and "empty" in res.output, res.output
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(st.root)))
    assert res.exit_code == 2 and var in res.output, res.output
    with pytest.raises(SigningConfigError, match="set but empty"):
        st.open_certified(vid)


def test_ed25519_sign_on_one_machine_verify_with_the_public_key_only(tmp_path, monkeypatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = tmp_path / "signing.pem"
    pub = tmp_path / "verify.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY_FILE", str(priv))
    st, vid = certified_store(tmp_path / "s")
    assert st.latest_certification(vid)["signature_alg"] == "ed25519"
    monkeypatch.delenv("PREFPIPE_SIGNING_KEY_FILE")
    monkeypatch.setenv("PREFPIPE_VERIFY_KEY_FILE", str(pub))
    assert st.get(vid).verify_chain().ok
    # a verify-only machine cannot certify
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations")
    assert res.exit_code == 2 and "cannot sign" in res.output
    # a record signed by another private key
    other = Ed25519PrivateKey.generate()
    priv.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    monkeypatch.setenv("PREFPIPE_SIGNING_KEY_FILE", str(priv))
    certify_version(st, vid, POLICY, run_gx=False)
    monkeypatch.delenv("PREFPIPE_SIGNING_KEY_FILE")
    status = st.get(vid).verify_chain()
    assert not status.ok and status.link == "signature"


def test_verify_only_key_refuses_to_certify_before_writing_anything(tmp_path, monkeypatch):
    """README, exit 2: "a bad signing key; nothing is written" -- not the part facts and Great
    Expectations results of a certification whose record could never be signed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = tmp_path / "verify.pem"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    monkeypatch.setenv("PREFPIPE_VERIFY_KEY_FILE", str(pub))
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(tmp_path)))
    assert res.exit_code == 2 and "cannot sign" in res.output, res.output
    assert not (st.root / "certifications").exists() or not any((st.root / "certifications").iterdir())


# ---------------------------------------------------------------- a broken store: clear errors, nothing lost
def test_damaged_manifest_is_listed_and_skipped_by_latest(tmp_path):
    st = Store(tmp_path / "s")
    old = curate(SAMPLES[:1], st, POLICY).version_id
    time.sleep(0.01)
    new = curate(SAMPLES[1:2], st, POLICY).version_id
    (st.versions_dir / new / "manifest.json").write_text('{"version_id": "v-')
    listed = json.loads(cli("versions", "--store", str(st.root), "--json").stdout)
    assert {r["version_id"]: bool(r["damaged"]) for r in listed} == {old: False, new: True}
    res = cli("versions", "--store", str(st.root))
    assert res.exit_code == 0 and "DAMAGED" in res.output
    assert st.resolve("latest").version_id == old
    for args in (("show", new), ("certify", new, "--no-expectations"), ("diff", old, new)):
        res = cli(*args, "--store", str(st.root))
        assert res.exit_code == 2 and "damaged manifest" in res.output and new in res.output, (args, res.output)
    # a child of "latest" builds on the undamaged version
    res = cli("curate", str(SAMPLES[2]), "--store", str(st.root), "--parent", "latest", "--policy", str(policy_file(tmp_path)))
    assert res.exit_code == 0, res.output
    child = res.stdout.strip().splitlines()[-1]
    assert st.get(child).manifest().parent_version == old


def test_manifest_edited_in_place_behind_the_listing_cache_is_listed_damaged(tmp_path):
    """A manifest rewritten in place with its size and mtime put back (the listing's cache keys on
    them) is still parsed by versions: that version is DAMAGED, the listing does not exit 2."""
    st = Store(tmp_path / "s")
    old = curate(SAMPLES[:1], st, POLICY).version_id
    new = curate(SAMPLES[1:2], st, POLICY).version_id
    assert cli("versions", "--store", str(st.root)).exit_code == 0  # the cache now has both
    p = st.versions_dir / new / "manifest.json"
    before = p.stat()
    data = p.read_bytes()
    with open(p, "r+b") as fh:  # same inode, same size
        fh.write(data.replace(b'"version_id"', b'"version_iX"', 1))
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    res = cli("versions", "--store", str(st.root), "--json")
    assert res.exit_code == 0, res.output
    assert {r["version_id"]: bool(r["damaged"]) for r in json.loads(res.stdout)} == {old: False, new: True}
    res = cli("versions", "--store", str(st.root))
    assert res.exit_code == 0 and "DAMAGED" in res.output, res.output


def test_manifest_copied_from_another_version_is_damaged(tmp_path):
    st = Store(tmp_path / "s")
    a = curate(SAMPLES[:1], st, POLICY).version_id
    b = curate(SAMPLES[1:2], st, POLICY).version_id
    shutil.copy(st.versions_dir / a / "manifest.json", st.versions_dir / b / "manifest.json")
    assert [e.version_id for e in st.list_versions() if e.damaged] == [b]


def test_orphan_version_folder_is_swept_by_the_next_writer(tmp_path):
    st = Store(tmp_path / "s")
    vid = curate(SAMPLES[:1], st, POLICY).version_id
    shutil.rmtree(st.versions_dir / vid)
    (st.versions_dir / vid / "data").mkdir(parents=True)  # half-copied by hand: no manifest
    (st.versions_dir / vid / "data" / "train.parquet").write_bytes(b"junk")
    assert st.list_ids() == []
    res = curate(SAMPLES[:1], st, POLICY)
    assert res.version_id == vid and res.created and st.get(vid).verify() == []


def test_unsafe_version_ids_never_touch_a_path(store):
    st, vid = store
    before = sorted(p.relative_to(st.root) for p in st.root.rglob("*"))
    for ref in (f"../versions/{vid}", f"/{vid}", "..", f"{vid}/../{vid}", "v-[ab]*"):
        res = cli("certify", ref, "--store", str(st.root), "--no-expectations")
        assert res.exit_code == 2 and "not allowed" in res.output, (ref, res.output)
        assert cli("show", ref, "--store", str(st.root)).exit_code == 2
    assert sorted(p.relative_to(st.root) for p in st.root.rglob("*")) == before


def test_glob_characters_in_the_store_path(tmp_path):
    st, vid = certified_store(tmp_path / "st[1]*?")
    assert st.get(vid).verify_chain().ok
    res = cli("versions", "--store", str(st.root), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["certified"] is True


def test_disk_full_during_certify_leaves_no_partial_record(store, monkeypatch):
    st, vid = store
    before = st.certification_path(vid).read_bytes()
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr("pipeline.store.os.fsync", full)
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(st.root)))
    assert res.exit_code == 2 and "No space left on device" in res.output
    assert st.certification_path(vid).read_bytes() == before  # the old record is intact
    assert not list(st.certification_path(vid).parent.glob(".*.tmp"))
    monkeypatch.setattr("pipeline.store.os.fsync", real_fsync)
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(st.root)))
    assert res.exit_code == 0 and len(st.certification_history(vid)) == 2


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "prefpipe-test", str(path)], capture_output=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({rc.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_disk_full_and_read_only_store(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "8m") as mnt:
        st, vid = certified_store(mnt / "s")
        filler = mnt / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as fh:  # the close of a full file raises too
            while True:
                fh.write(b"\0" * (1 << 16))
        before = st.certification_path(vid).read_bytes()
        res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(tmp_path)))
        assert res.exit_code == 2 and "No space left on device" in res.output
        assert st.certification_path(vid).read_bytes() == before
        res = cli("curate", str(SAMPLES[1]), "--store", str(st.root), "--policy", str(policy_file(tmp_path)))
        assert res.exit_code == 2 and "No space left on device" in res.output, res.output
        assert st.list_ids() == [vid] and not any((st.root / ".staging").iterdir())
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        res = cli("curate", str(SAMPLES[1]), "--store", str(st.root), "--policy", str(policy_file(tmp_path)))
        assert res.exit_code == 2 and "Read-only file system" in res.output, res.output
        res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(tmp_path)))
        assert res.exit_code == 2 and "Read-only file system" in res.output, res.output
        assert st.get(vid).verify_chain().ok  # still readable and certified


def test_versions_on_another_filesystem_is_a_clear_error(tmp_path):
    other = Path("/dev/shm") / f"prefpipe-test-{uuid.uuid4().hex[:8]}"
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    other.mkdir()
    try:
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "versions").symlink_to(other)
        res = cli("curate", str(SAMPLES[0]), "--store", str(tmp_path / "s"), "--policy", str(policy_file(tmp_path)))
        assert res.exit_code == 2 and "another filesystem" in res.output, res.output
        assert list(other.iterdir()) == [] and not any((tmp_path / "s" / ".staging").iterdir())
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_kill_9_during_certify_leaves_the_old_record_or_none(store):
    """A certify killed while it writes its record: readers see the previous record (or none), never half of one."""
    st, vid = store
    before = st.certification_path(vid).read_bytes()
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import pipeline.store as s
        real = os.replace
        def slow(a, b):
            print("WRITING", flush=True); time.sleep(60); real(a, b)
        s.os.replace = slow
        from pipeline.certify import certify_version
        from schemas.policy import policy_from_dict
        certify_version(s.Store({str(st.root)!r}), {vid!r}, policy_from_dict({{"certify": {{"require_expectations": False}}}}), run_gx=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert st.certification_path(vid).read_bytes() == before and st.get(vid).verify_chain().ok
    res = cli("certify", vid, "--store", str(st.root), "--no-expectations", "--policy", str(policy_file(st.root)))
    assert res.exit_code == 0 and len(st.certification_history(vid)) == 2


def test_every_marked_inbox_file_is_a_batch_or_a_reported_failure(tmp_path):
    """The .done marker says "this file is complete": a marked .json (a type the readers take) is curated,
    a marked .tsv fails with its reason instead of waiting unseen forever, and a marked file that cannot be
    read (a dangling link) is reported without stopping the others.  Unmarked files are not read."""
    from pipeline.inbox import pending_batches

    st = Store(tmp_path / "s").ensure()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.json", "b.tsv", "c.jsonl", "d.jsonl"):
        if name == "d.jsonl":
            (inbox / name).symlink_to(tmp_path / "gone.jsonl")
        else:
            shutil.copy(SAMPLES[0] if name != "b.tsv" else SAMPLES[1], inbox / name)
        if name != "c.jsonl":  # c.jsonl is still being copied
            (inbox / (name + ".done")).touch()
    (inbox / "e.jsonl.done").touch()  # a marker without its file
    got = {b.path.name: b for b in pending_batches(inbox, st)}
    assert sorted(got) == ["a.json", "b.tsv", "d.jsonl"]
    assert got["a.json"].error is None and len(got["a.json"].sha256) == 64
    assert "unknown file type '.tsv'" in got["b.tsv"].error and len(got["b.tsv"].sha256) == 64
    assert got["d.jsonl"].sha256 == "" and "cannot read" in got["d.jsonl"].error


def test_damaged_line_in_inbox_failures_does_not_block_the_inbox(tmp_path):
    from pipeline.inbox import failed_hashes, pending_batches

    st = Store(tmp_path / "s").ensure()
    (st.root / "inbox").mkdir()
    good = "a" * 64
    (st.root / "inbox" / "failed.jsonl").write_bytes(
        json.dumps({"sha256": good}).encode() + b"\n{\"sha256\": \n\xff\xfe\n[1, 2]\n")
    assert failed_hashes(st) == {good}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(SAMPLES[0], inbox / SAMPLES[0].name)
    (inbox / (SAMPLES[0].name + ".done")).touch()
    assert [b.path.name for b in pending_batches(inbox, st)] == [SAMPLES[0].name]
