"""DPO training on a certified dataset version, top to bottom (in the spirit of nanoGPT's train.py).

    cfg = TrainConfig(store="store", version="v-...", model="tiny-llama:layers=4,hidden=256,heads=4")
    result = train(cfg)            # -> RunResult(run_dir, ...); STORE/runs/<run_id>/

Steps: (1) open the version, refusing it unless every split matches its sha256 in the
manifest and its latest certification says "certified"; (2) tokenise train and validation
with the chat template (``trainer.tokenize``; drops and truncations go to the run ledger);
(3) reference log-probs, cached beside the version (``trainer.reference``; the reference
model is freed before the policy exists); (4) policy, AdamW, warmup + cosine schedule;
(5) run directory, lineage, or resume from the latest checkpoint; (6) the loop: gradient
accumulation, clipping, eval every ``eval_every`` steps, checkpoints every
``checkpoint_every``, the final eval before the final checkpoint; (7) test-split evaluation,
plot, report, lineage.

A non-finite training loss or gradient norm (NaN/inf: lr too high, bf16 overflow, a bad
batch) stops the loop at that step before the optimizer applies it, and so does a non-finite
validation or test loss: ``TrainingDiverged`` (CLI exit code 5), with run.json ``status:
"failed"`` and ``failure`` (reason, step, value, lr, the pairs of the step) and a ``failed``
lineage event; checkpoints written before stay, nothing is written for the failing step.  The
check reads the Python floats the loop already logs (no extra device sync).

Loss per optimizer step over its K micro-batches of B pairs (pairs i, weights w_i = the row's
``weight`` when ``use_pair_weights``): L = sum_i w_i l_i / sum_i w_i, with l_i the DPO-family
loss of ``trainer.objectives`` on policy log-probs from the fused lm-head
(``trainer.model.sequence_logps``: the part's sequences packed into one padding-free forward).
Each forward pass (whole pairs, at most ``pack_tokens`` tokens) backpropagates its share
sum_{i in part} w_i l_i / sum_i w_i, so K x B, 1 x (K*B) and any ``pack_tokens`` give the same
gradient; only the activation memory differs.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.store import SPLITS, NotCertified, Store, VersionHandle, VersionNotFound
from schemas.ids import safe_id
from trainer import runs
from trainer.data import (
    SLICE_COLUMNS,
    Batch,
    PairStream,
    batches_in_order,
    collate,
    forward_parts,
    read_pair_tags,
    read_split_rows,
)
from trainer.evaluate import BootstrapConfig, evaluate_slices
from trainer.external import export_checkpoint, run_eval_cmd, split_eval_cmd
from trainer.loss import DEFAULT_CHUNK_SIZE
from trainer.model import ModelSource, ModelSpecError, build_model, describe, parse_model, sequence_logps
from trainer.objectives import DPOLossConfig, dpo_objective
from trainer.optim import AdamW
from trainer.reference import SHA256_FIELD as REFERENCE_SHA256_FIELD
from trainer.reference import cache_key, cache_key_material, compute_reference_logps, load_or_compute
from trainer.report import write_run_report
from trainer.tokenize import (
    TINY_TOKENIZER,
    TokenizeConfig,
    ledger_summary,
    load_tokenizer,
    tokenize_rows,
    tokenizer_fingerprint,
)


class TrainConfig(BaseModel):
    """Everything a run depends on; frozen, so its hash names the run and guards resumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: Path
    version: str = Field(description="version id, unique prefix or 'latest'")
    model: str = Field("tiny-llama", description="local HF causal-LM directory or a tiny spec, e.g. tiny-llama:layers=4,hidden=256,heads=4")
    tokenizer: str | None = Field(None, description="local tokenizer dir; default: the model dir, else the repo's tiny tokenizer")
    reference_model: str | None = Field(None, description="default: the policy's initial weights")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights' dtype")
    precision: Literal["fp32", "bf16-mixed"] = Field("fp32", description="bf16-mixed: float32 weights and optimizer, "
                                                     "bf16 matmuls (autocast body + fused lm-head), float32 reductions")
    seed: int = 0
    max_length: int = Field(512, ge=8)
    max_prompt_length: int | None = Field(None, ge=1)
    loss: DPOLossConfig = DPOLossConfig()
    use_pair_weights: bool = True
    batch_size: int = Field(4, ge=1, description="pairs per micro-batch")
    grad_accum: int = Field(1, ge=1)
    pack_tokens: int = Field(2048, ge=1, description="tokens per packed forward+backward pass (whole pairs, packed "
                                                     "back to back; a longer pair runs alone); bounds activation "
                                                     "memory, not the math (the step's gradient is the same)")
    pairs_per_forward: int | None = Field(None, ge=1, description="also at most this many pairs per forward pass")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(5e-5, gt=0, allow_inf_nan=False)  # inf passes gt=0 and trains to NaN weights
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1, description="tokens per fused lm-head tile")
    compile: bool = Field(False, description="torch.compile the model body's forward (dynamic shapes); measured in "
                                             "docs/benchmarks.md, off by default")
    eval_every: int = Field(50, ge=0, description="0: only at the end")
    eval_max_pairs: int | None = Field(None, ge=1)
    test_eval: bool = Field(True, description="after training: per-slice evaluation on the test split (eval.json, "
                                              "eval.parquet, report.html / report.md)")
    test_eval_every: int = Field(0, ge=0, description="also log test-split loss / reward metrics every N steps (0: off)")
    bootstrap_resamples: int = Field(1000, ge=10, description="bootstrap resamples for the evaluation's CIs")
    export: bool = Field(False, description="write the final policy to RUN/export/ (save_pretrained layout, safetensors)")
    eval_cmd: str | None = Field(None, description="after training, run this command once on the exported checkpoint "
                                                   "('{checkpoint}' is replaced by its directory; no shell); its JSON "
                                                   "stdout goes into external_eval.json, run.json and the lineage")
    eval_cmd_timeout: float = Field(3600.0, gt=0)
    checkpoint_every: int = Field(100, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    ref_batch_size: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1)
    mmap_threshold_kib: int | None = Field(128, ge=1, description="glibc malloc mmap threshold (caps heap "
                                                                  "fragmentation); None: leave malloc alone")
    on_template_mismatch: Literal["skip", "fail"] = Field(
        "skip", description="a pair whose chat template breaks the prompt-prefix property: skip it (counted in the "
                            "ledger with its pair id) or fail the run naming it")
    run_id: str | None = None
    resume: bool = False

    # fields that do not change what is computed; a resume may change them
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "run_id", "resume", "threads", "eval_every", "eval_max_pairs", "checkpoint_every", "keep_checkpoints",
        "ref_batch_size", "store", "mmap_threshold_kib", "test_eval", "test_eval_every", "bootstrap_resamples",
        "export", "eval_cmd", "eval_cmd_timeout"})

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_plain_name(cls, v: str | None) -> str | None:
        return None if v is None else safe_id(v, what="run id")  # it becomes STORE/runs/<run_id>

    @field_validator("eval_cmd")
    @classmethod
    def _eval_cmd_splits(cls, v: str | None) -> str | None:
        if v is not None:
            split_eval_cmd(v)  # unbalanced quotes: a bad option (exit 2) now, not a traceback after training
        return v

    @model_validator(mode="after")
    def _prompt_budget_leaves_room(self) -> TrainConfig:
        # TokenizeConfig holds the rule; checked here so that a bad pair of lengths is a bad option
        # (CLI exit 2), not a traceback from inside train() after the version was opened
        try:
            self.tokenize_config()
        except ValidationError as err:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None
        return self

    def tokenize_config(self) -> TokenizeConfig:
        return TokenizeConfig(max_length=self.max_length, max_prompt_length=self.max_prompt_length)

    def fingerprint(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_FIELDS))


class VersionRefused(Exception):
    """The trainer will not read this version (CLI exit code 4)."""


class VersionTampered(VersionRefused):
    pass


class VersionNotCertified(VersionRefused):
    pass


class ResumeMismatch(ValueError):
    pass


class TrainingDiverged(FloatingPointError):
    """A training loss, gradient norm or evaluation loss became NaN/inf at optimizer step ``step``
    (CLI exit code 5).  ``what``: "loss", "grad_norm", "eval/loss" or "test/loss"; ``value``: the float.
    The run directory records it (run.json ``status: "failed"``, ``failure``)."""

    def __init__(self, message: str, *, step: int, what: str, value: float, run_dir: Path):
        super().__init__(message)
        self.step, self.what, self.value, self.run_dir = step, what, value, run_dir


class NoTrainingPairs(ValueError):
    """Tokenisation left no train pair (every one dropped or skipped; the message has the split's ledger)."""


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    steps: int
    final: dict[str, Any]
    ledger: dict[str, Any] = None  # type: ignore[assignment]  # split -> tokenize ledger
    evaluation: dict[str, Any] | None = None  # eval.json's summary (test split, per slice)
    already_finished: bool = False  # a resume of a finished run: its recorded results, nothing trained or written


def open_certified_version(store: Store, ref: str) -> VersionHandle:
    """The version, after verifying the chain certificate -> manifest -> files (``Store.open_certified``);
    its files are verified again when read (``VersionHandle.read_split``)."""
    try:
        return store.open_certified(ref)
    except NotCertified as err:
        cls = VersionTampered if err.link in ("manifest", "publication", "files", "signature") else VersionNotCertified
        raise cls(f"refusing to train ({err.link} link broken): {err}") from None


def lr_schedule(step: int, *, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak`` over ``warmup``
    steps, then cosine down to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def dpo_batch_loss(model, b: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(w_i * l_i per pair (B,), weights used (B,), metrics) for one micro-batch."""
    lp = sequence_logps(model, b.input_ids, b.completion_mask, chunk_size=cfg.chunk_size, precision=cfg.precision)
    n = b.size
    weight = b.weight if cfg.use_pair_weights else torch.ones_like(b.weight)
    losses, metrics = dpo_objective(lp.summed[:n], lp.summed[n:], b.ref_chosen, b.ref_rejected, cfg.loss,
                                    chosen_lengths=lp.num_tokens[:n], rejected_lengths=lp.num_tokens[n:], weight=weight)
    return losses, weight, metrics


@torch.no_grad()
def evaluate(model, pairs, ref, pad_id: int, cfg: TrainConfig) -> dict[str, float]:
    """Validation metrics over every pair: loss = sum w l / sum w; the rest are means over pairs
    (none but ``eval/pairs`` = 0 when the split has no pair)."""
    model.eval()
    sums: dict[str, float] = {}
    wl = wsum = n = 0.0
    for group in batches_in_order(pairs, cfg.batch_size * 2):
        b = collate(group, pad_id, ref)
        losses, weight, metrics = dpo_batch_loss(model, b, cfg)
        wl, wsum, n = wl + float(losses.sum()), wsum + float(weight.sum()), n + b.size
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b.size
    model.train()
    if not n:  # every pair of the split dropped by tokenisation: no loss (0.0 would read as a perfect one)
        return {"eval/pairs": 0}
    return {"eval/loss": wl / max(wsum, 1e-12), **{f"eval/{k}": v / n for k, v in sums.items()}, "eval/pairs": int(n)}


class RunInUse(ResumeMismatch):
    """Another process trains or resumes this run now (it holds ``STORE/.locks/train-run-<run_id>.lock``): two
    processes writing one run directory would interleave its checkpoints and metrics (CLI exit 2)."""


def train(cfg: TrainConfig, *, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> RunResult:
    """A DPO run on a certified version (steps 1-7 of the module's docstring).  The run is held for the whole
    run -- from its claim (a new run) or before its reference pass (a resume) -- by the store's lock of its id:
    a resume while the run still trains (a scheduler's retry), or two resumes at once, is refused (:class:`RunInUse`)."""
    with contextlib.ExitStack() as held:
        return _train(cfg, on_event, held)


def _hold_run(store: Store, held: contextlib.ExitStack, run_id: str) -> None:
    if not held.enter_context(store.try_lock(f"train-run-{run_id}")):
        raise RunInUse(f"run {run_id} is in use: another process is training or resuming it now; "
                       "wait for it to stop (resume it then if it did not finish)")


def _hold_version(store: Store, held: contextlib.ExitStack, ref: str) -> VersionHandle:
    """The certified version behind ``ref``, held (:meth:`Store.in_use`, shared) from before its verification to the
    run's end: a run reads the version after its start too (the pair tags and the test split's slices in the
    evaluation), and ``prefpipe gc --delete V --apply`` removed a version under a running run.  gc now keeps a held
    version and lists it as in use.  Held, the version is looked up again: gc may have removed it between the
    lookup of ``ref`` and the hold."""
    version_id = store.resolve(ref).version_id
    held.enter_context(store.in_use(version_id))
    if not store.exists(version_id):
        raise VersionNotFound(f"version {version_id} was removed (`prefpipe gc`) before the run could use it; "
                              "nothing written")
    return open_certified_version(store, version_id)


def _train(cfg: TrainConfig, on_event: Callable[[str, dict[str, Any]], None] | None,
           held: contextlib.ExitStack) -> RunResult:
    emit = on_event or (lambda kind, payload: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs.cap_heap_fragmentation(cfg.mmap_threshold_kib)

    # ---- 1. data: only a certified version whose files match the manifest, held until the run ends
    store = Store(cfg.store)
    handle = _hold_version(store, held, cfg.version)
    manifest, cert = handle.manifest(), handle.certification()
    rows = {split: read_split_rows(handle, split) for split in ("train", "validation")}
    rows["test"] = read_split_rows(handle, "test", extra=SLICE_COLUMNS) if (cfg.test_eval or cfg.test_eval_every) else []

    # ---- 2. tokenizer and tokenisation (drops and truncations are counted in the ledger)
    src: ModelSource = parse_model(cfg.model, default_seed=cfg.seed)
    tok_path = cfg.tokenizer or (src.value if src.kind == "path" and _has_tokenizer(Path(src.value)) else str(TINY_TOKENIZER))
    tok = load_tokenizer(tok_path, light=True)  # the repo's tokenizer without importing transformers
    tcfg = cfg.tokenize_config()
    pairs, ledger = {}, {}
    for split, split_rows in rows.items():
        pairs[split], led = tokenize_rows(tok, split_rows, tcfg, on_mismatch=cfg.on_template_mismatch)
        ledger[split] = led.as_dict()
    if not pairs["train"]:  # said before the reference pass and the run directory, with the reasons
        raise NoTrainingPairs(f"version {handle.version_id}: no train pair left after tokenisation "
                              f"({ledger_summary(ledger['train'], 'train')}); a pair whose prompt alone "
                              "does not fit in --max-length is dropped, not cut (docs/trainer.md, Truncation)")
    if cfg.eval_max_pairs is not None:
        pairs["validation"] = pairs["validation"][:cfg.eval_max_pairs]
    vocab = len(tok)
    emit("tokenized", ledger)

    # ---- 3. reference log-probs, computed once per key and cached beside the version
    ref_src = parse_model(cfg.reference_model, default_seed=cfg.seed) if cfg.reference_model else src
    for role, model_src in (("model", src), ("reference model", ref_src)):
        if model_src.kind == "path":
            _check_same_vocabulary(role, Path(model_src.value), tok, tok_path)
    material = cache_key_material(
        version_id=handle.version_id, split_sha256={s: i.sha256 for s, i in manifest.splits.items()},
        reference=ref_src.identity(vocab), tokenizer=tokenizer_fingerprint(tok), tokenize_cfg=tcfg,
        dtype=cfg.dtype if cfg.precision == "fp32" else f"{cfg.dtype}+{cfg.precision}")
    if cfg.resume:  # before the reference pass: a resumed run continues on the data and reference it started with
        if cfg.run_id:
            _hold_run(store, held, cfg.run_id)
        _check_resume_inputs(store, cfg, handle.version_id, material)
    ref = load_or_compute(store, handle.version_id, material, pairs, lambda: build_model(ref_src, vocab, dtype=cfg.dtype),
                          pad_id=tok.pad_token_id, batch_size=cfg.ref_batch_size, chunk_size=cfg.chunk_size,
                          on_batch=lambda k: emit("reference", {"pairs": k}), precision=cfg.precision)

    # ---- 4. policy, AdamW (no decay on norms/biases, as nanoGPT), warmup + cosine schedule
    model = build_model(src, vocab, dtype=cfg.dtype)
    model.train()
    if cfg.compile:  # the forward only: parameter names (checkpoints) stay those of the module
        body = model.get_decoder()
        body.forward = torch.compile(body.forward, dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = AdamW(groups, betas=cfg.adam_betas)
    get_lr = partial(lr_schedule, peak=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
    stream = PairStream(pairs["train"], seed=cfg.seed)

    # ---- 5. run directory + lineage, or resume from the latest checkpoint
    fingerprint = cfg.fingerprint()
    run_id = cfg.run_id or f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{_short_hash(fingerprint)}"
    run_dir = store.root / "runs" / run_id
    step, tokens_seen, train_seconds = 0, 0, 0.0
    if cfg.resume:
        started = _read_run_json(run_dir, run_id)
        ckpt = runs.latest_checkpoint(run_dir)
        if ckpt is None:
            raise ResumeMismatch(f"cannot resume {run_id}: no checkpoint under {runs.checkpoint_dir(run_dir)}")
        try:
            state = runs.load_checkpoint(ckpt)
            # `version` as typed may differ ('latest' then its id): the resolved id was checked against run.json
            same = {k: v for k, v in fingerprint.items() if k != "version"}
            if not isinstance(state.get("fingerprint"), dict):
                raise runs.CheckpointError(f"{ckpt / 'state.json'}: no settings fingerprint; not a checkpoint of a run")
            theirs = {k: v for k, v in state["fingerprint"].items() if k != "version"}
            if theirs != same:
                diff = sorted(k for k in same.keys() | theirs.keys() if same.get(k) != theirs.get(k))
                raise ResumeMismatch(f"cannot resume {run_id} from {ckpt.name}: settings differ in {', '.join(diff)}")
            step, tokens_seen, train_seconds = _restore(ckpt, state, model, optimizer, stream)
        except runs.CheckpointError as err:  # the way on, when an older checkpoint of the run is intact
            older = sorted(p.name for p in runs.checkpoint_dir(run_dir).glob("step-*") if p.is_dir() and p != ckpt)
            if older:
                err.add_note(f"the run has an older checkpoint, {older[-1]}: move {ckpt.name} out of "
                             f"{ckpt.parent} to resume from it")
            raise
        if started.get("status") == "finished":  # (same settings, checked above): nothing is trained or written again
            emit("done", {"run_dir": str(run_dir), "already_finished": True, **(started.get("final") or {})})
            evaluation = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
            return RunResult(run_id, run_dir, step, started.get("final") or {}, started.get("tokenize_ledger"), evaluation,
                             already_finished=True)
        lineage = {**started, "status": "running", "resumed_from": ckpt.name}
        for key in ("failure", "failed_at"):  # an earlier failure of this run stays in the lineage's "failed" event
            lineage.pop(key, None)
        # metrics.jsonl cut back to the checkpoint (a damaged line refuses the resume) before run.json says running
        log = runs.MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step)
    else:
        _hold_run(store, held, run_id)  # (before the claim: a resume of it is refused from the first moment)
        try:  # exclusive: two runs started together with one id (or the same settings in the same second) never share it
            run_dir.mkdir(parents=True)
        except FileExistsError:
            raise FileExistsError(f"run directory {run_dir} exists; pick another run_id or pass resume=True") from None

    def record_failure(failure: dict[str, Any]) -> None:
        """run.json (atomically rewritten) says ``status: "failed"`` with ``failure``; the version's lineage gets a
        "failed" event.  A failure after the run's final record (in the report, say) takes the place of ``final``."""
        nonlocal phase
        phase = "ended"
        log.close()
        for key in ("final", "finished_at"):
            lineage.pop(key, None)
        lineage.update({"status": "failed", "failed_at": failure["at"], "failure": failure})
        runs.write_json(run_dir / "run.json", lineage)
        runs.append_lineage(store, handle.version_id, {"event": "failed", "at": failure["at"], "run_id": run_id,
                                                       "run_dir": str(run_dir), "failure": failure})

    def on_exit(_type: type[BaseException] | None, err: BaseException | None, _tb: Any) -> bool:
        """Whatever ends the run once it started -- a full disk writing a checkpoint or the eval tables, an error in
        the final evaluation, the report or the export, a KeyboardInterrupt -- is recorded: run.json says
        ``status: "failed"`` with ``failure`` (reason ``error`` or ``interrupted``, the error's type and message,
        the steps done, the last checkpoint), the lineage a "failed" event, and the error goes on with a note naming
        the record.  (Unrecorded, run.json said "running" for ever: neither finished nor failed.)  It runs
        first as ``held`` unwinds, before the run's lock is released: a resume waiting for the lock never has its
        "running" overwritten by this record.  A new run's directory that ends before its run.json is removed."""
        if err is None or phase == "ended":
            return False
        if phase == "claimed":
            shutil.rmtree(run_dir, ignore_errors=True)
            return False
        interrupted = not isinstance(err, Exception)  # KeyboardInterrupt, SystemExit
        last = _last_checkpoint_name(run_dir)
        failure = {"reason": "interrupted" if interrupted else "error", "step": step, "at": runs.now(),
                   "error": type(err).__name__, "message": _clip(str(err)) or ("interrupted" if interrupted else ""),
                   "last_checkpoint": last}
        try:
            record_failure(failure)
        except Exception as unrecorded:  # noqa: BLE001 - (a full disk: the record may not fit) the run's error goes on
            err.add_note(f"run {run_id} could not be recorded as failed in {run_dir / 'run.json'}: {unrecorded}")
            return False
        with contextlib.suppress(Exception):  # (the caller's hook: the run's own error is the one that goes on)
            emit("failed", failure)
        err.add_note(f"run {run_id} stopped after step {step}; recorded as failed in {run_dir / 'run.json'}; "
                     + (f"resume it from {last} with --resume {run_id}" if last else
                        f"it has no checkpoint to resume from: start a new run (another --run-id, or remove {run_dir})"))
        return False

    # "claimed": a new run's directory before its run.json; "running": run.json is this process's (a resume's from
    # here on); "ended": run.json says finished or failed.  What ends the run before "ended" is recorded (on_exit).
    phase = "running" if cfg.resume else "claimed"
    held.push(on_exit)  # (pushed last: runs before the run's and the version's holds are released)
    if not cfg.resume:
        lineage = {
            "run_id": run_id, "status": "running", "started_at": runs.now(), "version_id": handle.version_id,
            "certification": {k: (cert or {}).get(k) for k in ("verdict", "policy_hash", "certified_at")},
            "split_sha256": {s: i.sha256 for s, i in manifest.splits.items()},
            "model": {**src.identity(vocab), **describe(model)}, "reference_model": ref_src.identity(vocab),
            "reference_cache": {"key": ref.key, "path": str(ref.path)},
            "tokenizer": {"path": str(tok_path), **tokenizer_fingerprint(tok)},
            "beta": cfg.loss.beta, "objective": cfg.loss.loss_type, "loss": cfg.loss.model_dump(),
            "code_version": runs.code_version(), "torch": torch.__version__, "tokenize_ledger": ledger,
        }
        runs.write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
        log = runs.MetricsLog(run_dir / "metrics.jsonl")
    lineage["reference_cache"]["hit"] = ref.hit
    runs.write_json(run_dir / "run.json", lineage)
    phase = "running"
    runs.append_lineage(store, handle.version_id, {"event": "resumed" if cfg.resume else "started", "at": runs.now(),
                                                   "run_id": run_id, "run_dir": str(run_dir), "step": step,
                                                   **{k: lineage[k] for k in ("beta", "objective", "code_version")}})
    emit("start", {"run_id": run_id, "run_dir": str(run_dir), "step": step, "max_steps": cfg.max_steps,
                   "reference_cache_hit": ref.hit, "train_pairs": len(pairs["train"])})

    def checkpoint() -> None:
        runs.save_checkpoint(run_dir, step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                             meta={"data_position": stream.position, "tokens_seen": tokens_seen,
                                   "train_seconds": train_seconds, "fingerprint": fingerprint},
                             keep=cfg.keep_checkpoints)

    def fail(reason: str, at_step: int, what: str, value: float, message: str, **detail: Any) -> TrainingDiverged:
        """Record a non-finite value in run.json and the lineage; returns the exception to raise.
        Non-finite floats are written as strings ("nan", "inf"): run.json stays strict JSON."""
        failure = {"reason": reason, "step": at_step, "at": runs.now(), what: _json_float(value),
                   **{k: _json_float(v) for k, v in detail.items()}, "last_checkpoint": _last_checkpoint_name(run_dir)}
        record_failure(failure)
        emit("failed", failure)
        return TrainingDiverged(f"{message}; run {run_id} stopped, recorded in {run_dir / 'run.json'} (last checkpoint: "
                                f"{failure['last_checkpoint'] or 'none'})", step=failure["step"], what=what,
                                value=value, run_dir=run_dir)

    def run_eval(split: str = "validation") -> dict[str, Any]:
        metrics = evaluate(model, pairs[split], ref.logps, tok.pad_token_id, cfg)
        if not math.isfinite(metrics.get("eval/loss", 0.0)):  # (a split without pairs has no loss)
            name = "validation" if split == "validation" else "test"
            raise fail(f"non_finite_{name}_loss", step, f"{'eval' if name == 'validation' else 'test'}/loss",
                       metrics["eval/loss"],
                       f"evaluation after step {step}: {name} loss {metrics['eval/loss']} over "
                       f"{metrics['eval/pairs']} {name} pairs is not finite; "
                       + _divergence_hint(cfg))
        if split == "validation":
            record = {"kind": "eval", "step": step, **metrics}
        else:  # the test split's curve: same metrics, "test/" names
            record = {"kind": "test", "step": step, **{"test/" + k.split("/", 1)[1]: v for k, v in metrics.items()}}
        log.write(record)
        emit("eval" if split == "validation" else "test", record)
        return record

    # ---- 6. the loop
    # a resume from the final checkpoint (the run stopped after it: test evaluation, report) has its final
    # validation eval in the log already; computing it again would log a second one for the same step
    last_eval: dict[str, Any] = next((r for r in reversed(log.records) if r["kind"] == "eval" and r["step"] == step),
                                     {}) if cfg.resume else {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        micro = [stream.take(cfg.batch_size) for _ in range(cfg.grad_accum)]  # the step's pairs, K x B
        total_weight = sum(p.weight if cfg.use_pair_weights else 1.0 for mb in micro for p in mb)
        step_loss, sums, tokens, bad_part = 0.0, {}, 0, None
        for mb in micro:
            # A pair's loss needs only its own two sequences, so the micro-batch runs in parts of at
            # most `pack_tokens` tokens, each part's sequences packed into one padding-free forward:
            # only one part's activations are alive at once, the gradient is the same sum.
            # Metrics are means over the step's pairs.
            for part in forward_parts(mb, cfg.pack_tokens, cfg.pairs_per_forward):
                b = collate(part, tok.pad_token_id, ref.logps)
                losses, _, metrics = dpo_batch_loss(model, b, cfg)
                loss = losses.sum() / max(total_weight, 1e-12)  # this part's share of the step loss
                loss.backward()
                part_loss = float(loss.detach())  # the one sync per part, for the log and the finiteness check
                step_loss, tokens = step_loss + part_loss, tokens + b.num_tokens
                if bad_part is None and not math.isfinite(part_loss):
                    bad_part = b.pair_ids
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b.size / (len(micro) * cfg.batch_size)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lr = get_lr(step)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # stop before the step is applied
            what, value = ("loss", step_loss) if not math.isfinite(step_loss) else ("grad_norm", grad_norm)
            pair_ids = bad_part or [p.pair_id for mb in micro for p in mb]
            raise fail(f"non_finite_{'train_loss' if what == 'loss' else 'grad_norm'}", step + 1, what, value,
                       f"training diverged at step {step + 1}: loss {step_loss}, gradient norm {grad_norm} (lr "
                       f"{lr:.3g}), not finite; the step was not applied and nothing was written for it; pairs "
                       f"{'of the first non-finite forward' if bad_part else 'of the step'}: {_few(pair_ids)}; "
                       + _divergence_hint(cfg),
                       loss=step_loss, grad_norm=grad_norm, lr=lr, pair_ids=pair_ids[:20])
        optimizer.step(lr)
        optimizer.zero_grad()
        step += 1
        dt = time.perf_counter() - t0
        tokens_seen, train_seconds = tokens_seen + tokens, train_seconds + dt
        record = {"kind": "train", "step": step, "epoch": round(stream.epoch, 4), "lr": lr, "loss": step_loss,
                  **sums, "grad_norm": grad_norm, "tokens": tokens, "tokens/s": tokens / dt,
                  "peak_rss_mib": round(runs.peak_rss_mib(), 1), "time_s": round(dt, 4)}
        log.write(record)
        # the final eval runs before the final checkpoint: a model that evaluates to NaN leaves none
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            last_eval = run_eval()
        if cfg.test_eval_every and step % cfg.test_eval_every == 0 and pairs["test"]:
            run_eval("test")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            checkpoint()
        emit("step", record)

    # ---- 7. final eval (here only when resuming a finished run), test-split evaluation per slice, plot, report, lineage
    if last_eval.get("step") != step:
        last_eval = run_eval()
    log.close()
    final = {"step": step, "tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 3),
             "tokens_per_s": tokens_seen / max(train_seconds, 1e-9), "peak_rss_mib": round(runs.peak_rss_mib(), 1),
             **{k: v for k, v in last_eval.items() if k.startswith("eval/")}}
    test_summary = None
    if cfg.test_eval:
        test_summary = _evaluate_test_split(cfg, handle, rows["test"], pairs["test"], ref.logps, model, src, vocab,
                                            tok.pad_token_id, run_dir)
        emit("test_eval", test_summary)
        if test_summary.get("overall"):
            o = test_summary["overall"]
            final["test"] = {"pairs": test_summary["pairs"],
                             **{f"{ph}/{m}": o[ph][m]["mean"] for ph in ("before", "after") for m in test_summary["metrics"]}}
    if cfg.export or cfg.eval_cmd:  # external benchmarks read a standard checkpoint, not our run dir
        lineage["export"] = str(export_checkpoint(model, tok, run_dir / "export"))
        if cfg.eval_cmd:
            ext = run_eval_cmd(cfg.eval_cmd, run_dir / "export", cwd=run_dir, timeout=cfg.eval_cmd_timeout)
            runs.write_json(run_dir / "external_eval.json", ext)
            final["external_eval"] = {k: ext.get(k) for k in ("status", "result", "seconds")}
            emit("external_eval", ext)
    # finished once all three are written: run.json (the report reads it), the report, the lineage's event; an error
    # before the last turns run.json to failed (on_exit), and a resume writes them again
    lineage.update({"status": "finished", "finished_at": runs.now(), "final": final})
    runs.write_json(run_dir / "run.json", lineage)
    write_run_report(run_dir)
    runs.append_lineage(store, handle.version_id, {"event": "finished", "at": runs.now(), "run_id": run_id,
                                                   "run_dir": str(run_dir), "final": final})
    phase = "ended"
    emit("done", {"run_dir": str(run_dir), **final})
    return RunResult(run_id, run_dir, step, final, ledger, test_summary)


def _evaluate_test_split(cfg: TrainConfig, handle: VersionHandle, test_rows: list[dict], test_pairs, ref_logps,
                         model, src: ModelSource, vocab: int, pad_id: int, run_dir: Path) -> dict[str, Any]:
    """Policy after vs before training against the reference on the test split, per slice, with
    bootstrap CIs (``trainer.evaluate``); writes eval.json, eval.parquet, eval_pairs.parquet."""
    import polars as pl

    if not test_pairs:
        summary = {"split": "test", "pairs": 0, "overall": None, "slices": [],
                   "note": "the version's test split is empty" if not test_rows else "no test pair survived tokenisation"}
        runs.write_json(run_dir / "eval.json", summary)
        return summary
    logp = {"reference": {p.pair_id: ref_logps[p.pair_id] for p in test_pairs}}
    logp["after"] = compute_reference_logps(model, test_pairs, pad_id=pad_id, batch_size=cfg.ref_batch_size,
                                            chunk_size=cfg.chunk_size, precision=cfg.precision)
    if cfg.reference_model is None:  # the reference is the initial policy: "before" is the reference itself
        logp["before"] = logp["reference"]
    else:
        logp["before"] = compute_reference_logps(build_model(src, vocab, dtype=cfg.dtype), test_pairs, pad_id=pad_id,
                                                 batch_size=cfg.ref_batch_size, chunk_size=cfg.chunk_size,
                                                 precision=cfg.precision)
    kept = {p.pair_id for p in test_pairs}
    rows = [r for r in test_rows if str(r["pair_id"]) in kept]
    lengths = {p.pair_id: (len(p.chosen_ids), len(p.rejected_ids)) for p in test_pairs}
    summary, tidy, per_pair = evaluate_slices(rows, logp, lengths, cfg.loss, tags=read_pair_tags(handle),
                                              protected=handle.store.protected_pair_ids(),
                                              boot=BootstrapConfig(resamples=cfg.bootstrap_resamples, seed=cfg.seed))
    summary["version_id"] = handle.version_id
    runs.atomic_write_parquet(pl.DataFrame(tidy), run_dir / "eval.parquet")
    runs.atomic_write_parquet(pl.DataFrame(per_pair), run_dir / "eval_pairs.parquet")
    runs.write_json(run_dir / "eval.json", summary)  # the summary last, as a checkpoint's index
    return summary


def make_config(store: Path | str, version: str, **options: Any) -> TrainConfig:
    """TrainConfig from flat options; beta / loss_type / label_smoothing / rpo_alpha go into ``loss``."""
    loss_keys = set(DPOLossConfig.model_fields)
    loss = {k: options.pop(k) for k in list(options) if k in loss_keys}
    if loss:
        options["loss"] = DPOLossConfig(**loss)
    return TrainConfig(store=Path(store), version=version, **options)


def train_version(store: Store | Path | str, version: str, **options: Any) -> Path:
    """Train on ``version`` with flat options (see :func:`make_config`); returns the run directory."""
    root = store.root if isinstance(store, Store) else Path(store)
    return train(make_config(root, version, **options)).run_dir


def _check_resume_inputs(store: Store, cfg: TrainConfig, version_id: str, material: dict[str, Any]) -> None:
    """A resume must read the version and reference log-probs its run started with.  The fingerprint
    holds the version *reference* as typed ('latest', a prefix), which can name another version by now
    (a newer one curated since), and a local model or tokenizer directory by path, whose files can
    change; run.json holds the resolved version id and the reference cache key (which hashes the
    splits, the reference model's files, the tokenizer and the tokenisation budget)."""
    if cfg.run_id is None:
        return  # nothing to resume from: the checkpoint lookup says so
    started = _read_run_json(store.root / "runs" / cfg.run_id, cfg.run_id)
    if started.get("version_id") != version_id:
        raise ResumeMismatch(f"cannot resume {cfg.run_id}: it trained on version {started.get('version_id')}, but "
                             f"{cfg.version!r} now resolves to {version_id}; resume with the version id it started "
                             f"with ({started.get('version_id')})")
    old_key = (started.get("reference_cache") or {}).get("key")
    if old_key is not None and old_key != cache_key(material):
        old_path = Path(str((started.get("reference_cache") or {}).get("path", ""))).with_suffix(".json")
        try:
            old = _read_json(old_path)
            old.pop(REFERENCE_SHA256_FIELD, None)  # (the sidecar's record of its file's bytes: not key material)
            diff = ", ".join(sorted(k for k in material.keys() | old.keys() if material.get(k) != old.get(k)))
        except (OSError, ValueError):
            diff = "unknown: the key material of the run's cache file is gone"
        raise ResumeMismatch(f"cannot resume {cfg.run_id}: its reference log-probs (cache key {old_key}) no longer "
                             f"match this run's inputs (key {cache_key(material)}; differing: {diff}): the model, "
                             "reference model, tokenizer or tokenisation changed since the run started")


def _read_run_json(run_dir: Path, run_id: str) -> dict[str, Any]:
    """The run.json of the run a resume continues: there, readable, a JSON object naming ``run_id`` -- else
    :class:`ResumeMismatch` (exit 2) saying which.  A run directory copied or renamed from another run
    (``cp -r runs/a runs/b``) names that run: resumed, its run.json would say one run and the lineage another."""
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise ResumeMismatch(f"cannot resume {run_id}: there is no run directory {run_dir}")
    try:
        run = _read_json(path)
    except FileNotFoundError:
        raise ResumeMismatch(f"cannot resume {run_id}: {path} is missing (not a run directory, or a run that stopped "
                             "before it started); start a new run") from None
    except (OSError, ValueError) as err:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise ResumeMismatch(f"cannot resume {run_id}: {path} cannot be read ({err})") from None
    if not isinstance(run, dict) or not isinstance(run.get("reference_cache"), dict):
        raise ResumeMismatch(f"cannot resume {run_id}: {path} is not a run record (a JSON object with the run's "
                             "lineage); it was edited or is not prefpipe's")
    if run.get("run_id") != run_id:
        raise ResumeMismatch(f"cannot resume {run_id}: {path} belongs to run {run.get('run_id')!r} (a run directory "
                             f"copied or renamed?); resume that run under its own id, or start a new run")
    return run


def _restore(ckpt: Path, state: dict[str, Any], model, optimizer: AdamW, stream: PairStream) -> tuple[int, int, float]:
    """Model, optimizer and data position from a loaded checkpoint; (step, tokens seen, train seconds).  Its files
    matched their sha256s, but an entry of the wrong shape or type (a checkpoint of another model, an edited
    state.json with its sha256 rewritten) is a :class:`~trainer.runs.CheckpointError` naming it, not a traceback."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # the schedule is a function of `step`
        position, step = int(state["data_position"]), int(state["step"])
        tokens_seen, train_seconds = int(state["tokens_seen"]), float(state["train_seconds"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise runs.CheckpointError(f"{ckpt}: its state does not fit this run ({type(err).__name__}: "
                                   f"{_clip(' '.join(str(err).split()), 300)})") from err
    stream.position = position
    return step, tokens_seen, train_seconds


def _clip(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text) - n} more characters)"


def _check_same_vocabulary(role: str, model_dir: Path, tok, tok_path: str) -> None:
    """A local model directory that ships its own tokenizer must share the run's token ids: the ids of
    the run's tokenizer index its embeddings and lm head.  A reference with another vocabulary of the same
    size loads and scores without an error -- and the DPO rewards are then against other tokens."""
    f = model_dir / "tokenizer.json"
    if not f.is_file() or Path(tok_path).resolve() == model_dir.resolve():
        return
    from tokenizers import Tokenizer

    try:
        theirs = Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on a damaged file
        raise ModelSpecError(f"{role} {model_dir}: its tokenizer.json cannot be read ({err})") from err
    ours = tok.get_vocab()
    if theirs != ours:
        differ = sorted(t for t in theirs.keys() | ours.keys() if theirs.get(t) != ours.get(t))
        raise ModelSpecError(
            f"{role} {model_dir} ships a tokenizer whose vocabulary differs from the run's ({tok_path}) in "
            f"{len(differ)} tokens (e.g. {', '.join(repr(t) for t in differ[:3])}): its embeddings and lm head index "
            "other tokens by the run's ids; use models that share the run's tokenizer")


def _divergence_hint(cfg: TrainConfig) -> str:
    low = cfg.precision != "fp32" or cfg.dtype != "float32"
    precision = (f"an overflow in low precision (precision {cfg.precision}, dtype {cfg.dtype}; try precision fp32 "
                 "with float32 weights)" if low else f"an overflow (precision {cfg.precision}, dtype {cfg.dtype})")
    return (f"likely causes: a learning rate too high for this model (--lr {cfg.lr:g}; try it lower, a longer "
            f"--warmup-steps or a smaller --grad-clip), {precision}, or a bad batch")


def _json_float(x: Any) -> Any:
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def _few(ids: list[str], n: int = 8) -> str:
    return ", ".join(ids[:n]) + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def _last_checkpoint_name(run_dir: Path) -> str | None:
    try:
        ckpt = runs.latest_checkpoint(run_dir)
    except runs.CheckpointError:  # a foreign entry: the failure is still recorded
        return None
    return ckpt.name if ckpt else None


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def _short_hash(obj: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["SPLITS", "TrainConfig", "RunResult", "VersionRefused", "VersionTampered", "VersionNotCertified",
           "ResumeMismatch", "TrainingDiverged", "open_certified_version", "train", "train_version", "make_config",
           "lr_schedule"]
