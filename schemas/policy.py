"""The curation and certification policy: one nested, frozen Pydantic config.

Every stage reads its own small section.  Unknown keys and out-of-range values are
rejected with the key path and the allowed range before any work starts.  The
policy's hash (canonical JSON, sha256) is part of version ids and cache keys.

Load with :func:`load_policy` from TOML (``.toml``) or YAML (``.yaml``/``.yml``);
``docs/policy.md`` documents every key, ``prefpipe policy show`` prints the effective
policy.
"""
from __future__ import annotations

import hashlib
import json
import reprlib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.registry import AnnotatorRegistry, RegistryError, load_registry

FlagAction = Literal["drop", "downweight", "warn"]

# what a bad value is shown as: bounded, so a YAML alias bomb or a megabyte string is not printed whole
_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 6, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def _short(value: Any) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: Any) -> Any:
        # Pydantic's lax mode reads true/false as 1/0: `max_quarantine_rate = true` would silently allow
        # every row into quarantine.  A number field takes a number.
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in (int, float, ByteSize):
            raise ValueError("expected a number, not true/false")
        return v


class IngestConfig(_Cfg):
    """Reading input files (``pipeline.readers``, ``docs/input-format.md``).

    The two caps bound what one hostile file can cost: memory per line stays below
    ``max_line_bytes`` (a line is never read whole beyond it), and the work a gzip bomb can
    cause stops at ``max_decompressed_bytes``.  Exceeding either makes the file unreadable
    (exit 2, nothing written).  Sizes are bytes, or text such as "64MiB" or "2GB".
    """

    batch_rows: int = Field(50_000, ge=1_000, description="rows parsed per streaming batch")
    partition_rows: int = Field(
        250_000, ge=1_000,
        description="judgments per partition (about): a first version is built partition by partition, on this "
                    "process or a Dask cluster (docs/scale-out.md); a worker holds one partition, so this sets its memory")
    max_line_bytes: ByteSize = Field(
        64 << 20, ge=1 << 10,
        description="a JSONL or CSV line longer than this makes the file unreadable (exit 2, naming the line)")
    max_decompressed_bytes: ByteSize = Field(
        64 << 30, ge=1 << 20,
        description="a .gz input that decompresses to more than this is unreadable (exit 2): stops gzip bombs early")


class NearDuplicateConfig(_Cfg):
    """Near-duplicate prompts (``pipeline.checks.near_duplicates``; measurements in ``docs/checks-text.md``).

    Shingles are word n-grams of the lower-cased prompt with punctuation dropped (scripts
    without spaces: characters and character bigrams are words).  ``shingle_size`` 1 (the set of
    words) keeps a one-word edit of a 5-60-word prompt at Jaccard >= 0.8, where character
    4-grams and word 2/3-grams drop to 0.4-0.6 on short prompts.  ``threshold`` 0.7 on the
    estimated Jaccard catches >= 98 % of such edits while < 1 % of unrelated real prompts
    reach it.  128 permutations give a standard error of <= 0.045 on the estimate; the
    banding uses datasketch's optimal (b, r) for ``candidate_threshold`` 0.5 (25 x 5), so a
    pair at J = 0.7 is a candidate with probability 0.99.  ``max_chars`` bounds the work
    per prompt (a longer prompt is compared on its first ``max_chars`` characters).
    """

    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    threshold: float = Field(0.7, gt=0.0, lt=1.0, description="estimated Jaccard at or above which prompts are near duplicates")
    candidate_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="LSH banding threshold (<= threshold)")
    shingle_size: int = Field(1, ge=1, le=5, description="word n-gram size (1 = set of words)")
    max_chars: int = Field(2000, ge=50, le=100_000, description="characters of a prompt that are shingled")
    seed: int = Field(1, ge=0, description="datasketch permutation seed")

    @model_validator(mode="after")
    def _candidate_below_threshold(self) -> NearDuplicateConfig:
        if self.candidate_threshold > self.threshold:
            raise ValueError(f"candidate_threshold ({self.candidate_threshold}) must be <= threshold ({self.threshold})")
        return self


class AggregationConfig(_Cfg):
    ai_mode: Literal["human_first", "separate", "vote", "ignore_ai"] = Field(
        "human_first",
        description=(
            "human_first: humans decide when any human judged the pair, AI labels only pairs no human judged; "
            "separate: AI-only and human-only labels are kept, pairs where they disagree are escalated; "
            "vote: AI judgments vote with weight ai_weight; ignore_ai: AI judgments are not used for labels"
        ),
    )
    ai_weight: float = Field(0.5, ge=0.0, le=1.0)
    ds_iterations: int = Field(50, ge=1, le=1000, description="Dawid-Skene EM iterations")


class AgreementConfig(_Cfg):
    low_agreement_threshold: float = Field(0.6, ge=0.0, le=1.0, description="per-pair agreement below this -> low_agreement")
    min_judgments: int = Field(2, ge=2, description="pairs with fewer judgments are not scored")
    bootstrap: int = Field(200, ge=0, le=10_000, description="bootstrap resamples for confidence intervals")
    seed: int = 0


class AnnotatorTestConfig(_Cfg):
    """Per-annotator tests (reliability, position bias, length bias); docs/checks-stats.md."""

    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="significance level (Benjamini-Hochberg FDR)")
    min_judgments: int = Field(20, ge=5, description="fewer decisive judgments -> insufficient_data, never a flag")
    power: float = Field(
        0.9, gt=0.5, lt=1.0,
        description="reliability only: the at-chance test runs only when it would find an annotator exactly at chance "
        "with at least this power; otherwise insufficient_data",
    )
    chance_margin: float = Field(
        0.05, ge=0.0, lt=0.5,
        description="reliability only: 'better than chance' means agreement above chance + margin * (1 - chance)",
    )
    useful_margin: float = Field(
        0.4, gt=0.0, lt=1.0,
        description="reliability only: the useful level chance + margin * (1 - chance) (0.7 at chance 0.5); an annotator "
        "is flagged when the upper confidence bound of its agreement is below it",
    )
    min_length_ratio: float = Field(
        1.1, ge=1.0, le=10.0, description="length bias only: pairs whose longer/shorter char ratio is below this are ignored",
    )


class LanguageConfig(_Cfg):
    """Language vs locale (``pipeline.checks.language``; measurements in ``docs/checks-text.md``).

    A text is profiled on its first ``profile_chars`` characters (script counts, function
    words); it is evidence only with >= ``min_chars`` letters (>= ``min_cjk_chars`` CJK
    characters for the CJK rule), and Latin text with more than ``max_code_share`` code
    symbols per letter is treated as code (no language).  langdetect (seeded) is asked only
    about Latin texts of >= ``min_words`` words whose function words are not conclusive, at
    most ``max_langdetect`` per run (~3-7 ms each), and counts only with probability >=
    ``min_probability``.  With these gates the real HH-RLHF / LLaMA-Factory en+zh rows give
    no flag while planted mismatches of a sentence or more are caught.
    """

    enabled: bool = True
    min_chars: int = Field(40, ge=1, description="texts with fewer letters give no evidence")
    min_cjk_chars: int = Field(12, ge=1, description="CJK characters needed for the CJK script rule")
    min_words: int = Field(8, ge=1, description="Latin words needed before langdetect is asked")
    min_probability: float = Field(0.95, gt=0.0, le=1.0, description="langdetect probability needed")
    max_code_share: float = Field(0.15, ge=0.0, description="code symbols per letter above which Latin text is code")
    profile_chars: int = Field(400, ge=50, le=100_000, description="characters of a text that are profiled")
    max_chars: int = Field(600, ge=50, description="characters of a text passed to langdetect")
    max_langdetect: int = Field(2000, ge=0, description="texts sent to langdetect per run at most")
    seed: int = 0


class ChecksConfig(_Cfg):
    near_duplicate: NearDuplicateConfig = NearDuplicateConfig()
    aggregation: AggregationConfig = AggregationConfig()
    agreement: AgreementConfig = AgreementConfig()
    reliability: AnnotatorTestConfig = AnnotatorTestConfig()
    position_bias: AnnotatorTestConfig = AnnotatorTestConfig()
    length_bias: AnnotatorTestConfig = AnnotatorTestConfig()
    language: LanguageConfig = LanguageConfig()
    max_label_share: float = Field(0.65, gt=0.5, le=1.0, description="a/b share above this in a slice -> label_imbalance")
    easy_strength: float = Field(0.9, ge=0.0, le=1.0, description="unanimous pairs at least this strong are too_easy")
    ambiguous_strength: float = Field(0.3, ge=0.0, le=1.0, description="split pairs at most this strong are ambiguous")
    imbalance_alpha: float = Field(
        0.01, gt=0.0, lt=0.5, description="label_imbalance needs the a/b share to differ from 0.5 at this level (BH across slices)"
    )
    min_slice_pairs: int = Field(20, ge=1, description="slices with fewer decisive-consensus pairs are not tested for imbalance")
    refit_growth: float = Field(
        0.1, ge=0.0, description="a child counts the annotator reliability check with its parent's fitted parameters "
        "(Dawid-Skene accuracies, independence) only while its batch adds at most this share of the parent's judgments; "
        "a bigger batch refits them over every judgment (docs/incremental.md)")


class SelectConfig(_Cfg):
    flag_actions: dict[str, FlagAction] = Field(
        default_factory=dict,
        description="what each flag reason does to the judgments/pairs/annotators it names; a reason not listed takes "
                    "its check's declared default (`prefpipe policy reasons`; pair_id_conflict: drop only)",
    )
    downweight_factor: float = Field(0.5, ge=0.0, le=1.0)
    route: dict[str, Literal["route", "drop"]] = Field(
        default_factory=lambda: {"tie": "route", "both_bad": "route", "escalate": "route"},
    )
    min_strength: float = Field(0.0, ge=0.0, le=1.0)
    weight_by: Literal["confidence", "agreement", "agreement_x_strength", "none"] = Field(
        "confidence", description="base weight of a DPO row: confidence (the accuracy-weighted share of the evidence for "
        "the consensus side; agreement where there is none), agreement, agreement x strength, or none (1.0)")
    max_tokens_per_pair: int = Field(4096, ge=16)
    tokenizer: str = Field("chars/4", description="how max_tokens_per_pair counts prompt + longer response: 'chars/4' "
                           "(estimate) or a local tokenizer directory/tokenizer.json (exact, e.g. "
                           "trainer/assets/tiny-chat-tokenizer)")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, v: str) -> str:
        if v != "chars/4" and not (Path(v).is_file() or (Path(v) / "tokenizer.json").is_file()):
            raise ValueError(f"expected 'chars/4' or a local tokenizer directory/tokenizer.json, found {v!r} (no such file)")
        return v

    @model_validator(mode="after")
    def _known_routes(self) -> SelectConfig:
        # flag_actions' reasons and actions are checked against the declared checks by
        # pipeline.checks.resolve_policy (schemas/ does not import the checks)
        bad_routes = sorted(set(self.route) - {"tie", "both_bad", "escalate"})
        if bad_routes:
            raise ValueError(f"select.route: unknown label(s) {bad_routes}; allowed: tie, both_bad, escalate")
        return self


class SplitConfig(_Cfg):
    train: float = Field(0.8, ge=0.0, le=1.0)
    validation: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 17

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions must sum to 1.0, found {total:g}")
        return self


_MIN_PAIRS_PER_SPLIT = {"train": 20, "validation": 2, "test": 2}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class CertifyConfig(_Cfg):
    min_pairs_per_split: dict[str, int] = Field(default_factory=lambda: dict(_MIN_PAIRS_PER_SPLIT))
    min_pairs_per_locale: int = Field(5, ge=0)
    min_krippendorff_alpha: float = Field(0.3, ge=-1.0, le=1.0, description="minimum nominal alpha on the independent "
                                          "overlap subset, per annotator kind (see docs/policy.md for the choice)")
    require_agreement: bool = Field(True, description="agreement must be measured before certifying; false opts out "
                                    "(the certificate records the opt-out)")
    min_overlap_share: float = Field(0.10, ge=0.0, le=1.0, description="share of a kind's pairs that >= 2 different "
                                     "annotators of that kind must have judged ...")
    min_overlap_pairs: int = Field(200, ge=1, description="... capped at this many pairs: need min(share x pairs, this)")
    min_qualified_overlap_pairs_per_locale: int = Field(
        50, ge=1, description="with an annotator registry: pairs of each locale that >= 2 different qualified humans must "
        "have judged, min(min_overlap_share x the locale's pairs, this)")
    max_biased_annotator_share: float = Field(0.10, ge=0.0, le=1.0)
    max_exact_duplicate_rate: float = Field(0.05, ge=0.0, le=1.0)
    max_near_duplicate_rate: float = Field(0.10, ge=0.0, le=1.0)
    max_quarantine_rate: float = Field(0.05, ge=0.0, le=1.0)
    label_balance: tuple[float, float] = (0.35, 0.65)
    ai_share: tuple[float, float] = (0.0, 0.8)
    require_expectations: bool = True
    train_after_certify: bool = False

    @field_validator("min_pairs_per_split", mode="before")
    @classmethod
    def _splits_and_counts(cls, v: Any) -> Any:
        # a misspelt split (`trian`) would otherwise be a gate nobody evaluates, and the real one keep its default
        if isinstance(v, dict):
            bad = sorted(str(k) for k in v if k not in ("train", "validation", "test"))
            if bad:
                raise ValueError(f"unknown split(s) {bad}; allowed: train, validation, test")
            wrong = {k: n for k, n in v.items() if not _is_count(n)}
            if wrong:
                raise ValueError(f"expected a whole number >= 0 of pairs per split, found {_short(wrong)}")
            # a split left out keeps its default, as a policy file's does (built in Python it was no minimum at all)
            return {**_MIN_PAIRS_PER_SPLIT, **v}
        return v

    @field_validator("require_agreement", "require_expectations", "train_after_certify", mode="before")
    @classmethod
    def _a_switch_is_true_or_false(cls, v: Any) -> Any:
        # lax mode read 0, "no" or "off" as false: a typo'd value silently opted out of a gate
        if not isinstance(v, bool):
            raise ValueError("expected true or false")
        return v

    @field_validator("label_balance", "ai_share", mode="before")
    @classmethod
    def _shares_are_numbers(cls, v: Any) -> Any:
        # [false, true] would otherwise read as [0.0, 1.0]: a gate every version passes
        if isinstance(v, list | tuple) and any(isinstance(x, bool) for x in v):
            raise ValueError("expected [low, high] as two numbers, not true/false")
        return v

    @field_validator("label_balance", "ai_share")
    @classmethod
    def _a_range_of_shares(cls, v: tuple[float, float]) -> tuple[float, float]:
        # [lo, hi] with lo > hi, or outside [0, 1], is a gate no version can pass
        lo, hi = v
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("expected [low, high] with 0 <= low <= high <= 1")
        return v


_DIM_NAME = r"^[a-z][a-z0-9_]*$"


class DimensionsConfig(_Cfg):
    """Per-dimension verdicts (``dimensions`` of a judgment; ``pipeline.dimensions``, docs/policy.md).

    The **dimension rule** is ``priority`` or ``primary`` (+ ``veto``), not both; without either
    there is no rule.  It derives ``label`` for a judgment that gives ``dimensions`` but no
    ``label`` (the judgment records ``label_derived``; without a rule such a row is quarantined),
    and it decides the label of a pair whose per-dimension consensus verdicts conflict (one
    dimension ``a``, another ``b``; reason ``dimension_conflict``).

    * ``priority``: dimensions in order; the first one with a decisive verdict (a or b) decides.
      With none decisive: ``both_bad`` if one of them says so, else ``tie``.
    * ``primary`` + ``veto``: the primary dimension's verdict, unless a veto dimension names the
      other side decisively: then ``veto_action`` (``escalate``: a person decides; ``veto_side``: the
      veto dimension's side wins; ``both_bad``).

    ``train_on`` builds the version on one dimension's verdicts instead of the overall label
    (judgments without a verdict on it do not vote: dropped as ``no_verdict_on_<dimension>``).
    """

    priority: list[str] = Field(default_factory=list, description="dimensions in order of precedence; the first "
                                "decisive one decides (e.g. [\"harmlessness\", \"helpfulness\"])")
    primary: str = Field("", description="the dimension whose verdict is the label, with veto dimensions (\"\": none)")
    veto: list[str] = Field(default_factory=list, description="dimensions that overrule the primary when they name "
                            "the other side decisively")
    veto_action: Literal["escalate", "veto_side", "both_bad"] = Field(
        "escalate", description="what a veto does: escalate (route to a person), veto_side (its side wins) or both_bad")
    train_on: str = Field("", description="build the version on this dimension's verdicts instead of the overall "
                          "label (\"\": the overall label); part of the policy hash, so of the version id")

    @field_validator("priority", "veto")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        import re

        bad = [x for x in v if not re.fullmatch(_DIM_NAME, x)]
        if bad:
            raise ValueError(f"expected dimension names matching [a-z][a-z0-9_]*, found {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"a dimension is named twice in {v}")
        return v

    @field_validator("primary", "train_on")
    @classmethod
    def _name(cls, v: str) -> str:
        import re

        if v and not re.fullmatch(_DIM_NAME, v):
            raise ValueError(f"expected a dimension name matching [a-z][a-z0-9_]*, found {v!r}")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> DimensionsConfig:
        if self.priority and self.primary:
            raise ValueError("give either priority or primary (+ veto), not both")
        if self.veto and not self.primary:
            raise ValueError("veto needs a primary dimension")
        if self.primary and self.primary in self.veto:
            raise ValueError(f"{self.primary!r} is both the primary and a veto dimension")
        return self

    @property
    def has_rule(self) -> bool:
        return bool(self.priority or self.primary)


class ReviewsConfig(_Cfg):
    """Reviews of routed pairs (judgments with ``review_of``; ``pipeline/reviews_resolve.py``, docs/reviews.md)."""

    mode: Literal["resolve", "vote"] = Field(
        "resolve", description="resolve: a pair an ancestor routed that a qualified human reviewed decisively takes the "
        "reviews' majority verdict (a tie between reviews keeps it routed; its agreement and weight come from the "
        "reviews); vote: reviews are ordinary votes next to the original judgments")


class Policy(_Cfg):
    """The whole policy. Defaults are a sensible starting point for mixed human/AI data."""

    name: str = "default"
    annotators: AnnotatorRegistry | None = Field(
        None, description="annotator registry (docs/input-format.md): in a policy file the path of a CSV or TOML "
        "registry, relative to the policy file; its content (not its path) is part of the policy hash")
    ingest: IngestConfig = IngestConfig()
    checks: ChecksConfig = ChecksConfig()
    select: SelectConfig = SelectConfig()
    split: SplitConfig = SplitConfig()
    certify: CertifyConfig = CertifyConfig()
    dimensions: DimensionsConfig = DimensionsConfig()
    reviews: ReviewsConfig = ReviewsConfig()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def policy_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the key and the rule.  ``path``: the file
    (when one was read), ``field``: the first key path at fault (what a --json failure names)."""

    def __init__(self, message: str, *, path: Path | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path, self.field = path, field


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid policy {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            lines.append(f"  {loc}: {e['msg']} (found {_short(e.get('input'))})")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def policy_from_dict(data: dict[str, Any], source: str = "<dict>", *, base: Path | None = None) -> Policy:
    """The defaults with ``data`` merged in, key by key at every level: a file that sets
    ``select.flag_actions.near_duplicate`` keeps the default action of every other reason.
    Unknown keys and out-of-range values raise :class:`PolicyError` naming them.  ``annotators``
    given as a path is read relative to ``base`` (the policy file's folder; default: the current one)."""
    if isinstance(data.get("annotators"), str):
        path = (base or Path()) / data["annotators"]
        try:
            data = {**data, "annotators": load_registry(path).model_dump(mode="json")}
        except RegistryError as err:
            raise PolicyError(f"invalid policy {source}: annotators = {data['annotators']!r}: {err}") from err
    try:
        return Policy.model_validate(_deep_merge(Policy().model_dump(mode="json"), data))
    except ValidationError as err:
        first = err.errors()[0]["loc"] if err.errors() else ()
        raise PolicyError(_format_validation(err, source), field=".".join(str(x) for x in first) or None) from err


def load_policy(path: str | Path | None) -> Policy:
    """Read a TOML or YAML policy file; ``None`` gives the defaults."""
    if path is None:
        return Policy()
    p = Path(path)
    try:
        return _load_policy_file(p)
    except PolicyError as err:
        err.path = err.path or p
        raise


def _no_repeated_yaml_keys(root: Any, p: Path) -> None:
    """A key given twice in one YAML mapping is refused, as TOML refuses it: PyYAML keeps the last one silently,
    so a threshold added further down a file replaced the one a reader saw first.  Walks the composed nodes
    (nothing constructed), each node once (an alias is not walked again: a YAML alias bomb stays cheap)."""
    import yaml

    seen: set[int] = set()
    todo: list[tuple[Any, str]] = [(root, "")]
    while todo:
        node, where = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                path = f"{where}.{key}" if where else str(key)
                if key is not None and key in lines:
                    err = PolicyError(f"invalid policy {p}:\n  {path}: given twice (lines {lines[key]} and "
                                      f"{k.start_mark.line + 1}); expected each key once", path=p, field=path)
                    err.line = k.start_mark.line + 1  # (what a --json failure names)
                    raise err
                if key is not None:
                    lines[key] = k.start_mark.line + 1
                todo.append((v, path))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, f"{where}.{i}") for i, v in enumerate(node.value)]


def _load_policy_file(p: Path) -> Policy:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyError(f"cannot read policy file {p}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise PolicyError(f"policy file {p}: expected UTF-8 text, found byte 0x{err.object[err.start]:02x} "
                          f"at offset {err.start}") from err
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            _no_repeated_yaml_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
            data = yaml.safe_load(text) or {}
        else:
            raise PolicyError(f"policy file {p}: expected .toml, .yaml or .yml, found {p.suffix or 'no suffix'!r}")
    except PolicyError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError (any syntax error)
        raise PolicyError(f"policy file {p} is not valid {p.suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {p}: expected a mapping at the top level")
    return policy_from_dict(data, str(p), base=p.parent)
