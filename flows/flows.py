"""Prefect flows: wiring only.  The logic lives in ``pipeline/`` and ``trainer/``.

* ``curate_batch``      plan -> ingest (one task per file, mapped; cached on file content) ->
                        build version (checks, select, split, store) -> artifacts
* ``certify_version``   certification gates + GX -> record + artifacts
* ``train_on_version``  refuses uncertified or tampered versions, then trains
* ``process_inbox``     picks up finished batch files (``<file>.done`` marker) from an inbox,
                        curates each new one as a child of the latest version, certifies it
                        and, if the policy says so, trains.  A batch whose sha256 is already a
                        source of a version is never curated twice; one that failed for a
                        transient reason (an OS error) is tried again on later ticks, a bounded
                        number of times, and one whose version was written but not certified
                        (a later step failed, the run was killed) has that version verified and
                        certified by the next tick; one whose certified version has no finished
                        training run yet is trained by the next tick (pipeline/inbox.py).  A review batch
                        (``prefpipe review import`` output) is a batch like any other: its child
                        version resolves the routed pairs it reviews (docs/reviews.md).

Tasks pass file paths and content hashes, never DataFrames.  Retries only where I/O can fail.
With no configuration Prefect runs on its temporary local server; ``PREFECT_API_URL`` points
the same flows at a real server.  Set ``PREFPIPE_DASK=local`` (or a scheduler address) to run
the mapped ingest tasks on a ``DaskTaskRunner``.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline import inbox as inbox_logic
from pipeline.curate import CurateOptions, build_version, existing_version, ingest_source, plan_version_id
from schemas.version import code_version
from pipeline.escape import md_escape, visible_controls  # artifact descriptions are Markdown; log lines plain
from pipeline.ingest import FileHash, IngestResult, file_sha256
from pipeline.readers import UnreadableFile
from pipeline.remote import Staged
from pipeline.store import DamagedVersion, Store, StoreError
from pipeline.checks import resolve_policy
from schemas.policy import Policy, load_policy
from schemas.ids import is_safe_id
from schemas.text import content_hash

SUPPORTED = (".jsonl", ".jsonl.gz", ".parquet", ".csv")


def _opts_key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def _work_token(work_dir: Path) -> str:
    """A random token that names this work dir for as long as it exists (created on first use):
    a store deleted and made again at the same path gets a new one, so Prefect's cache (kept in
    PREFECT_HOME, outside the store) never hands out a path of the old one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    token = work_dir / ".cache-token"
    if not token.exists():
        tmp = work_dir / f".cache-token.{uuid.uuid4().hex}.tmp"
        tmp.write_text(uuid.uuid4().hex, encoding="ascii")
        try:
            os.link(tmp, token)  # whole or not at all; the first writer wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return token.read_text(encoding="ascii").strip()


def _ingest_cache_key(context, parameters) -> str:
    # the work dir is part of the key: a cached result is a path, valid only for that store, and
    # only while the store's work dir is the one that ingested it (its token)
    work = Path(parameters["work_dir"]).resolve()
    return content_hash(f"ingest|{parameters['sha256']}|{parameters['ingest_json']}|{_opts_key(parameters['options'])}"
                        f"|{code_version()}|{work}|{_work_token(work)}")


@task(retries=2, retry_delay_seconds=2, persist_result=False)
def hash_file(path: str) -> str:
    return file_sha256(path)


@task(retries=1, retry_delay_seconds=2, cache_key_fn=_ingest_cache_key, cache_expiration=timedelta(days=30),
      task_run_name="ingest {path}")
def ingest_file(path: str, sha256: str, options: dict[str, Any], ingest_json: str, work_dir: str,
                hashed: FileHash | None = None) -> str:
    """Ingest one file into ``work_dir/<content key>/`` (skipped when already there) with the
    policy's ingest settings (block size, line and decompressed-size caps), which are part of the key.
    ``hashed``: the file is a URL input's copy (its rows name the URL)."""
    key = f"{sha256[:24]}-{content_hash(_opts_key(options))[:8]}-{content_hash(ingest_json)[:8]}"
    out = Path(work_dir) / key
    if not (out / "ingest.json").exists():
        pol = Policy.model_validate(json.loads(ingest_json))  # the ingest and dimensions sections
        ingest_source([Path(path)], CurateOptions(**options), pol, hashed={path: hashed} if hashed else None).save(out)
    return str(out)


@task(persist_result=False)
def build_version_task(store_dir: str, version_id: str, ingest_dirs: list[str], parent: str | None, policy_json: str) -> dict[str, Any]:
    store = Store(store_dir)
    policy = Policy.model_validate_json(policy_json)
    parts = [IngestResult.load(Path(d)) for d in ingest_dirs]
    parent_h = store.resolve(parent) if parent else None
    res = build_version(store, version_id, IngestResult.merge(parts), parent_h, policy)
    return {"version_id": res.version_id, "created": res.created, "timings": res.timings}


@task(persist_result=False)
def build_first_task(files: list[str], store_dir: str, policy_json: str, options: dict[str, Any],
                     hashed: dict[str, FileHash] | None = None) -> dict[str, Any]:
    """A first version, built over partitions (its partition tasks in this process, or on the Dask cluster
    PREFPIPE_DASK names: pipeline/partitioned_build.py).  ``hashed``: the URL inputs' copies."""
    from pipeline.curate import curate

    res = curate(files, Store(store_dir), Policy.model_validate_json(policy_json), options=CurateOptions(**options),
                 hashed=hashed)
    return {"version_id": res.version_id, "created": res.created, "timings": res.timings}


@task(persist_result=False)
def publish_version_artifacts(store_dir: str, version_id: str) -> None:
    from pipeline.artifacts import report_markdown, version_tables

    h = Store(store_dir).get(version_id)
    tables = version_tables(h)
    key = version_id.replace("_", "-").lower()
    create_markdown_artifact(report_markdown(h, tables["markdown"]), key=f"report-{key}",
                             description=f"prefpipe report for {md_escape(version_id)}")
    create_table_artifact(tables["ledger"], key=f"ledger-{key}", description="ledger: where every row went")
    create_table_artifact(tables["checks"], key=f"checks-{key}", description="check verdicts")
    create_table_artifact(tables["annotators"], key=f"annotators-{key}", description="annotator statistics")
    report = h.file("report.html")
    if report.exists():
        create_link_artifact(report.resolve().as_uri(), link_text=f"report.html of {version_id}", key=f"report-html-{key}")


def _task_runner():
    where = os.environ.get("PREFPIPE_DASK")
    if not where:
        return None
    from prefect_dask import DaskTaskRunner

    if where == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=where)


@flow(name="curate-batch", log_prints=True)
def curate_batch(files: list[str], store: str, policy_path: str | None = None, parent: str | None = None,
                 options: dict[str, Any] | None = None) -> str:
    """Ingest -> checks -> select -> split -> store; publishes the report and tables as artifacts."""
    log = get_run_logger()
    options = options or {}
    policy = resolve_policy(load_policy(policy_path))
    st = Store(store).ensure()
    parent_id = st.resolve(parent).version_id if parent else None
    # URL inputs (any fsspec filesystem): copied into the store's staging, hashed on the way (pipeline/remote.py)
    staged = Staged(st.root / ".staging" / f"inputs.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        return _curate_batch(files, st, policy, parent_id, options, staged, log)
    finally:
        staged.remove()


def _curate_batch(names: list[str], st: Store, policy: Policy, parent_id: str | None, options: dict[str, Any],
                  staged: Staged, log: Any) -> str:
    store = str(st.root)
    paths, hashed = staged.inputs(names)
    files = [str(p) for p in paths]
    shas = [hashed[f].sha256 if f in hashed else hash_file.submit(f) for f in files]
    sha_values = [s if isinstance(s, str) else s.result() for s in shas]
    version_id = plan_version_id(sha_values, parent_id, policy, CurateOptions(**options))
    if existing_version(st, version_id):  # (there and intact; there but damaged: raises, naming the file)
        log.info("version %s already exists: nothing to do", version_id)
    elif parent_id is None:  # a first version: partitioned (the files are read by the partitioning)
        res = build_first_task(files, store, policy.model_dump_json(), options, hashed or None)
        if res["version_id"] != version_id:  # (one rule for the id: pipeline.curate.plan_version_id)
            raise RuntimeError(f"planned version {version_id}, curate built {res['version_id']}")
        log.info("version %s %s", res["version_id"], "written" if res["created"] else "already existed")
    else:  # a child: each file ingested as a task (cached), then built here (its passes over the parent's parts: tasks)
        work = str(st.root / ".work" / "ingest")
        # what ingest reads of the policy (part of the ingest cache key): limits, and the dimension rule
        ingest_json = json.dumps({"ingest": policy.ingest.model_dump(mode="json"),
                                  "dimensions": policy.dimensions.model_dump(mode="json")}, sort_keys=True)
        futures = [ingest_file.submit(f, s, options, ingest_json, work, hashed.get(f)) for f, s in zip(files, sha_values, strict=True)]
        dirs = [fu.result() for fu in futures]
        res = build_version_task(store, version_id, dirs, parent_id, policy.model_dump_json())
        log.info("version %s %s", res["version_id"], "written" if res["created"] else "already existed")
    publish_version_artifacts(store, version_id)
    return version_id


def curate_batch_with_runner():
    runner = _task_runner()
    return curate_batch.with_options(task_runner=runner) if runner else curate_batch


@task(persist_result=False)
def certify_task(store: str, version: str, policy_json: str, run_gx: bool) -> dict[str, Any]:
    from pipeline.certify import certify_version as certify_logic

    cert = certify_logic(Store(store), version, Policy.model_validate_json(policy_json), run_gx=run_gx)
    return cert.model_dump(mode="json")


@flow(name="certify-version", log_prints=True)
def certify_version(store: str, version: str, policy_path: str | None = None, run_gx: bool = True) -> dict[str, Any]:
    policy = resolve_policy(load_policy(policy_path))
    cert = certify_task(store, version, policy.model_dump_json(), run_gx)
    rows = [{"gate": g["name"], "value": str(g["value"]), "threshold": str(g["threshold"]),
             "passed": g["passed"], "detail": g["detail"]} for g in cert["gates"]]
    key = cert["version_id"].lower()
    create_table_artifact(rows, key=f"certification-{key}", description=f"{md_escape(cert['verdict'])}: {md_escape(cert['version_id'])}")
    get_run_logger().info("%s: %s", cert["version_id"], cert["verdict"])
    return cert


@flow(name="train-on-version", log_prints=True)
def train_on_version(store: str, version: str, model: str = "tiny-llama", max_steps: int = 50,
                     extra: dict[str, Any] | None = None) -> str:
    """Refuses uncertified or tampered versions (raises); returns the run directory."""
    from pipeline.store import NotCertified

    try:
        h = Store(store).open_certified(version)
    except NotCertified as err:
        raise RuntimeError(f"refusing to train ({err.link} link broken): {err}") from None
    from trainer.train import train_version  # the trainer's public entry

    run_dir = train_version(Store(store), h.version_id, model=model, max_steps=max_steps, **(extra or {}))
    create_link_artifact(Path(run_dir).resolve().as_uri(), link_text=f"training run on {h.version_id}",
                         key=f"train-{h.version_id.lower()}")
    report = Path(run_dir) / "report.md"  # the run's evaluation report (user text escaped by trainer/report.py)
    if report.is_file():
        create_markdown_artifact(report.read_text(encoding="utf-8"), key=f"train-report-{h.version_id.lower()}",
                                 description=md_escape(f"training run {Path(run_dir).name} on {h.version_id}: evaluation"))
    return str(run_dir)


@flow(name="process-inbox", log_prints=True)
def process_inbox(inbox: str, store: str, policy_path: str | None = None, train_model: str | None = None) -> list[dict[str, Any]]:
    """Curate each new finished batch of the inbox as a child of the latest version, certify it,
    and train when the policy's ``certify.train_after_certify`` is set (on later ticks again, until a
    finished run of the version exists).  Returns what happened per batch; the run fails (visibly,
    with the reasons) if any batch failed, after the others ran."""
    log = get_run_logger()
    policy = resolve_policy(load_policy(policy_path))
    st = Store(store).ensure()
    # one inbox run at a time per store: two overlapping ticks (a long run past its schedule's next tick, a run
    # started by hand) would both take the same pending batches -- each certifying the same version, or building
    # on a parent the other is about to replace.  The later one leaves them to the run that holds the store.
    with st.try_lock(INBOX_RUN_LOCK) as held:
        if not held:
            log.warning("inbox %s: another inbox run is curating into store %s; this run leaves its batches to it "
                        "(the next tick takes what is still pending)", visible_controls(str(inbox)),
                        visible_controls(str(store)))
            return []
        return _process_pending(inbox, st, store, policy, policy_path, train_model, log)


INBOX_RUN_LOCK = "inbox-run"  # (STORE/.locks/inbox-run.lock: held by the inbox run curating into the store)


def _process_pending(inbox: str, st: Store, store: str, policy: Any, policy_path: str | None, train_model: str | None,
                     log: Any) -> list[dict[str, Any]]:
    """:func:`process_inbox`'s work, holding the store's inbox-run lock."""
    train = policy.certify.train_after_certify
    pending = inbox_logic.pending_batches(Path(inbox), st, train=train)
    if not pending:
        log.info("inbox %s: no new finished batches", visible_controls(str(inbox)))
        return []
    outcomes: list[dict[str, Any]] = []
    for batch in pending:
        ids = st.list_ids()
        parent = ids[-1] if ids else None
        out: dict[str, Any] = {"batch": batch.path.name, "sha256": batch.sha256}
        if batch.failed_tries:  # failed for a transient reason on earlier ticks (its training's, for a training try)
            out["attempt"] = batch.failed_tries + 1
        training = False
        try:
            if batch.error:  # known before curating (an unknown file type, a file that could not be hashed)
                raise UnreadableFile(batch.path, batch.error)
            if batch.train:  # certified on an earlier try, no finished training run of it: train it, nothing else
                vid, out["version"], out["verdict"] = batch.version, batch.version, "certified"
                out["resumed"] = "version certified on an earlier try, not trained yet: training it"
            else:
                if batch.version:  # written by an earlier try or a killed run, not certified: finish it, never rebuild it
                    out["resumed"] = _resume(st, batch.version, log)
                    vid = batch.version
                else:
                    vid = curate_batch(files=[str(batch.path)], store=store, policy_path=policy_path, parent=parent)
                out["version"] = vid
                cert = certify_version(store=store, version=vid, policy_path=policy_path)
                out["verdict"] = cert["verdict"]
            if out["verdict"] == "certified" and train:
                training = True
                out["run"] = train_on_version(store=store, version=vid, model=train_model or "tiny-llama")
        except Exception as err:  # noqa: BLE001 - one bad batch must not block the next
            out.update(_failure(st, batch.for_training(out["version"]) if training and not batch.train else batch, err,
                                version=out.get("version")))
            log.error("batch %s failed: %s%s", visible_controls(batch.path.name), visible_controls(out["error"]),
                      _retry_note(out))
        outcomes.append(out)
    failed = [o for o in outcomes if "error" in o]
    create_table_artifact([{k: str(v) for k, v in o.items()} for o in outcomes], key="inbox-last-run",
                          description=f"inbox {md_escape(inbox)}: {len(outcomes)} batch(es), {len(failed)} failed")
    if failed:
        raise RuntimeError("; ".join(f"{o['batch']}: {o['error']}{_retry_note(o)}" for o in failed))
    return outcomes


def _resume(st: Store, version_id: str, log: Any) -> str:
    """Make ready the version an earlier try wrote from a batch for the steps it did not finish: it must be
    there and intact (``existing_version``: a damaged one raises, naming the file -- never certified, never
    written over); its report artifacts are published again (the step that may have failed).  What the
    outcome says of it."""
    if not existing_version(st, version_id):  # collected since the listing: a later tick curates the batch anew
        raise FileNotFoundError(errno.ENOENT, f"version {version_id}, written from this batch on an earlier try, "
                                "is no longer in the store", str(st.versions_dir / version_id))
    log.info("version %s was written on an earlier try and is intact: finishing it (report, certification)", version_id)
    publish_version_artifacts(str(st.root), version_id)
    return "version written on an earlier try, verified intact"


def _failure(st: Store, batch: inbox_logic.Batch, err: Exception, *, version: str | None) -> dict[str, Any]:
    """What a batch's outcome says of its failure, once recorded (a file that could not be hashed is not:
    it is looked at again on the next tick).  ``transient``: an error of the operating system; ``version``:
    the version written from the batch (on this try -- also by a curate flow that failed after writing it --
    or an earlier one), when there is one; ``retry``: a later tick tries the batch again -- it has tries left
    (pipeline/inbox.py) and is not done: no version yet, or one not certified, or (a training try,
    ``batch.train``) one certified but not trained.  ``damaged``: the damaged version the try failed on, and the error
    says how to remove it (the next tick then curates the batch anew).  A failure that cannot be
    recorded (the store's disk full...) is said so (``unrecorded``): that try is not counted."""
    out: dict[str, Any] = {"error": str(err), "transient": inbox_logic.is_transient(err)}
    if batch.train:
        out["training"] = True
    if not batch.sha256:
        return out
    damaged = None if out["transient"] or batch.train else _damaged_version(st, err)
    if damaged:
        out["damaged"] = damaged
        out["error"] = _with_remedy(str(err), st, damaged, batch.path.name)
    try:
        version = version or inbox_logic.unfinished_versions(st).get(batch.sha256)
        done = not batch.train and version is not None and inbox_logic.is_finished(st, version)
    except (OSError, StoreError):  # (the store cannot be looked at now; the next tick's listing will)
        done = False
    if version:
        out["version"] = version
    try:
        rec = inbox_logic.record_failure(st, batch, str(err), transient=out["transient"], version=version,
                                         damaged=damaged)
        retry = rec["retry"]
        if batch.train:
            out["attempt"] = rec["attempt"]  # (the training's own tries)
    except (OSError, StoreError) as rec_err:  # (its lock too) no record of this try: the next tick tries the batch again
        why = getattr(rec_err, "strerror", None) or rec_err  # (an OSError's own text names the file again)
        out["unrecorded"] = f"this failure could not be recorded in {st.root / 'inbox' / 'failed.jsonl'}: {why}"
        retry = True
    out["retry"] = retry and not done
    return out


def _damaged_version(st: Store, err: Exception) -> str | None:
    """The id of the version of ``st`` whose damage ``err`` reports (``existing_version``, ``check_parent_published``:
    a :class:`DamagedVersion` with the version's directory as ``path``), else None."""
    where = getattr(err, "path", None) if isinstance(err, DamagedVersion) else None
    if not isinstance(where, str):
        return None
    d = Path(where)
    try:
        ours = d.parent == st.versions_dir or d.parent.resolve() == st.versions_dir.resolve()
    except OSError:
        ours = False
    return d.name if ours and is_safe_id(d.name) else None


def _with_remedy(message: str, st: Store, version_id: str, batch_name: str) -> str:
    """The damaged-version error with the inbox's remedy in place of the one-shot CLI's ("curate again"): the
    exact command, and that the next tick then curates the batch anew (pipeline/inbox.py)."""
    head, sep, _ = message.partition("; nothing written.")
    remedy = (f"Remove it (`prefpipe gc --store {shlex.quote(str(st.root))} --delete {version_id} --apply`): the next "
              f"tick curates {batch_name} anew")
    return f"{head}; nothing written. {remedy}" if sep else f"{message}. {remedy}"


def _retry_note(outcome: dict[str, Any]) -> str:
    notes = []
    if outcome.get("transient"):
        tries = f"try {outcome.get('attempt', 1)} of {inbox_logic.TRANSIENT_ATTEMPTS}"
        notes.append(f"transient, {tries}: {'tried again on the next tick' if outcome.get('retry') else 'not tried again'}")
    if outcome.get("unrecorded"):
        notes.append(f"{outcome['unrecorded']}; this try is not counted")
    if outcome.get("version") and "verdict" not in outcome and outcome.get("damaged") != outcome["version"]:
        notes.append(f"version {outcome['version']} is written, not certified"
                     + ("" if outcome.get("retry") else ", and stays so"))
    if outcome.get("training"):
        notes.append(f"version {outcome['version']} is certified, not trained"
                     + (" yet" if outcome.get("retry") else ", and stays so"))
    return f" ({'; '.join(notes)})" if notes else ""
