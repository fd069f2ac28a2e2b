"""Chat-template tokenisation of DPO rows: prompt ids, completion ids, completion masks.

For each pair (TRL conversational format: ``prompt`` a list of messages, ``chosen`` /
``rejected`` one assistant message each) and each side s in {chosen, rejected}::

    P   = encode(template(prompt, add_generation_prompt=True))
    F_s = encode(template(prompt + s))
    F_s[:len(P)] == P          else the pair is skipped and counted (``skipped_template_mismatch``,
                               with its pair_id), or PrefixMismatchError naming it (``on_mismatch="fail"``)
    C_s = F_s[len(P):]         the completion, including the turn-closing EOS the template emits

    input_ids_s       = P + C_s                               (P, C_s after truncation)
    completion_mask_s = [0] * len(P) + [1] * len(C_s)         only completion tokens count

Special tokens: the text is encoded with ``add_special_tokens=False``, so the chat template
is the one source of BOS/EOS and nothing is doubled.  Text from the data (message contents,
replies) is always text: when one contains a special-token string (``<|im_end|>``, the EOS
string, ...), the row's template is rendered with placeholders for the contents, split at the
template's own special tokens, and the pieces between them (template text + contents) are
encoded with the tokenizer's specials disabled (``split_special_tokens``) and as the one string
would encode them there (no SentencePiece "▁" after a special token, the whitespace an lstrip /
rstrip special takes in left out, a ``single_word`` special beside a word character left text),
so only that text's ids differ.  A ``normalized`` special is matched in the normalizer's output,
so a text spelling it so ("</S>" with a lowercasing normalizer) counts too; when that normalizer
works across the pieces (Strip, Prepend) the row is skipped (``skipped_normalizer_spans_specials``).
Such texts are counted (``special_token_text``); rows without one are encoded as one string, as TRL does.
Two repairs for templates that differ: a BOS is prepended only when the tokenizer would add
one (its post-processor or ``add_bos_token``) and the template did not emit one; a run of BOS
at the start is collapsed to one.  An EOS is appended to a completion only if it contains none (templates that do not
close the assistant turn); a completion ending in EOS EOS loses the second.

Truncation policy (``max_length`` L, the budget for prompt + completion of each side;
``max_prompt_length`` Lp, default L // 2; longest = max(len(C_chosen), len(C_rejected))):

1. **drop** the pair when the prompt alone leaves fewer than ``min_completion_tokens`` of the
   budget (len(P) + min_completion_tokens > L): counted as ``dropped_prompt_too_long``;
2. **keep the prompt's end**: when len(P) + longest > L and len(P) > Lp, the prompt is
   left-truncated to max(Lp, L - longest) tokens -- the end (the last user turn and the
   assistant header the completion follows) is kept, the start is cut; a leading BOS is
   kept in front.  Counted as ``prompt_truncated``;
3. **then the completions' end**: completions longer than L - len(P) keep their start
   (the truncated one then has no EOS, correctly: the sequence did not end there).
   Counted as ``completion_truncated``.

Every row ends in exactly one ledger bucket (``kept``, a ``dropped_*`` or a ``skipped_*`` reason);
``prompt_truncated`` / ``completion_truncated`` count kept pairs that were cut.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

TINY_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tiny-chat-tokenizer"


class TokenizeConfig(BaseModel):
    """Sequence budget; part of the reference-cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_length: int = Field(512, ge=8, description="budget for prompt + completion, per side")
    max_prompt_length: int | None = Field(None, ge=1, description="prompts are never cut below this; default max_length // 2")
    min_completion_tokens: int = Field(1, ge=1, description="drop pairs whose prompt leaves less room than this")

    @model_validator(mode="after")
    def _prompt_fits(self) -> TokenizeConfig:
        if self.max_prompt_length is not None and self.max_prompt_length + self.min_completion_tokens > self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} leaves no room for a completion "
                             f"within max_length={self.max_length}")
        return self

    @property
    def prompt_floor(self) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


class PrefixMismatchError(ValueError):
    """The chat template renders the prompt differently alone than followed by a reply."""

    def __init__(self, pair_id: str, side: str, position: int, prompt_tail: str, full_at: str):
        self.pair_id, self.side, self.position = pair_id, side, position
        super().__init__(
            f"pair {pair_id!r} ({side}): the tokenized prompt is not a prefix of the tokenized prompt + {side} "
            f"reply; they differ at token {position}: prompt has {prompt_tail!r}, prompt + reply has {full_at!r}. "
            "The chat template must render the prompt (with add_generation_prompt=True) exactly as it begins "
            "the full conversation; fix the template or use one that has this property")


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """One DPO pair after tokenisation and truncation."""

    pair_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]  # completion tokens only
    rejected_ids: tuple[int, ...]
    weight: float = 1.0

    def input_ids(self, side: str) -> list[int]:
        return [*self.prompt_ids, *(self.chosen_ids if side == "chosen" else self.rejected_ids)]

    def completion_mask(self, side: str) -> list[int]:
        comp = self.chosen_ids if side == "chosen" else self.rejected_ids
        return [0] * len(self.prompt_ids) + [1] * len(comp)

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens of both sequences (what tokens/s counts)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


LEDGER_KEYS = ("rows_in", "kept", "dropped_prompt_too_long", "dropped_empty_completion",
               "skipped_template_mismatch", "prompt_truncated", "completion_truncated", "special_token_text")
LEDGER_IDS_KEPT = 50  # pair ids listed per reason (the counts are complete)


@dataclass
class TokenizeLedger:
    """Where each row went: rows_in = kept + dropped_* + skipped_*; *_truncated count kept rows that were cut;
    ``special_token_text`` counts data texts holding a special-token string (encoded as plain text).

    ``skipped_*`` rows are bad for a reason of the template, not of length (a prompt that the
    chat template renders differently alone than followed by a reply); ``skipped`` lists them
    with the side and token position where the two renderings differ."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEDGER_KEYS, 0))
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, pair_id: str | None = None) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if pair_id is not None and key.startswith(("dropped_", "skipped_")):
            self.dropped_ids.setdefault(key, []).append(pair_id)

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts, "dropped_pair_ids": {k: v[:LEDGER_IDS_KEPT] for k, v in self.dropped_ids.items()},
                "skipped": self.skipped[:LEDGER_IDS_KEPT]}


# ---------------------------------------------------------------- tokenizer loading / identity
class TokenizerError(ValueError):
    """A ``--tokenizer`` that cannot be used: the message names the directory and the reason (CLI exit 2)."""


def load_tokenizer(path: str | Path | None = None, *, light: bool = False):
    """A local tokenizer (default: the repo's tiny chat tokenizer); never downloads.

    ``light=True`` loads the repo's own tokenizer as a :class:`ChatTokenizer` (tokenizers +
    jinja2, no transformers import: about 25 MiB less resident memory, same ids); any other
    tokenizer is always loaded with transformers' ``AutoTokenizer``.
    """
    src = Path(path) if path is not None else TINY_TOKENIZER
    # checked here, not left to transformers: it takes a path that is not a directory for a Hub repo id
    if not src.is_dir():
        raise TokenizerError(f"tokenizer {src}: no such directory (a local tokenizer directory; nothing is downloaded)")
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise TokenizerError(f"tokenizer {src}: no tokenizer.json or tokenizer_config.json in the directory")
    if light and src.resolve() == TINY_TOKENIZER:
        tok = ChatTokenizer(src)
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - transformers / tokenizers raise KeyError, plain Exception... on a damaged file
            raise TokenizerError(f"tokenizer {src}: cannot be loaded ({type(err).__name__}: {err})") from err
    if tok.chat_template is None:
        raise TokenizerError(f"tokenizer at {src} has no chat_template; DPO rows are conversations and need one")
    if tok.pad_token_id is None:  # right padding never reaches the loss; any id works
        tok.pad_token = tok.eos_token
    return tok


class ChatTokenizer:
    """The subset of a transformers fast tokenizer that this module uses, for the repo's tokenizer.

    ``tokenizers.Tokenizer`` for the ids and a sandboxed jinja2 environment configured as
    transformers' ``apply_chat_template`` (trim_blocks, lstrip_blocks, loop controls) for the
    template.  Only for ``trainer/assets/tiny-chat-tokenizer`` (byte-level BPE, no post-processor
    specials, a plain ChatML template), where tests check it against ``AutoTokenizer`` id for id;
    real models' tokenizers go through transformers.
    """

    def __init__(self, path: Path):
        import jinja2.ext
        import jinja2.sandbox
        from tokenizers import Tokenizer

        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.source_dir = path
        self.backend_tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token, self.eos_token, self.pad_token = cfg.get("bos_token"), cfg.get("eos_token"), cfg.get("pad_token")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        self._template = env.from_string(self.chat_template) if self.chat_template else None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self.backend_tokenizer.get_added_tokens_decoder()

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 split_special_tokens: bool = False) -> dict[str, Any]:
        self.backend_tokenizer.encode_special_tokens = split_special_tokens  # per call, as transformers sets it
        if isinstance(text, str):
            return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}
        encs = self.backend_tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs]}

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        if tokenize:
            raise ValueError("ChatTokenizer.apply_chat_template renders text only (tokenize=False)")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)


def tokenizer_fingerprint(tok) -> dict[str, str]:
    """sha256 of the tokenizer's vocabulary/merges/normaliser (its JSON) and of its chat template."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = json.dumps({"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}, sort_keys=True)
    return {
        "tokenizer_sha256": hashlib.sha256((body + specials).encode("utf-8")).hexdigest(),
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode("utf-8")).hexdigest(),
    }


# ---------------------------------------------------------------- special-token rules
@dataclass(frozen=True)
class _Specials:
    bos: int | None
    eos: int | None
    tokenizer_adds_bos: bool


def _specials(tok) -> _Specials:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    with_special = tok("x", add_special_tokens=True)["input_ids"]
    adds_bos = bos is not None and len(with_special) > 0 and with_special[0] == bos
    return _Specials(bos, eos, adds_bos)


def _fix_bos(ids: list[int], sp: _Specials) -> list[int]:
    if sp.bos is None:
        return ids
    n = 0
    while n < len(ids) and ids[n] == sp.bos:
        n += 1
    if n > 1:
        return ids[n - 1:]  # a run of BOS -> one
    if n == 0 and sp.tokenizer_adds_bos:
        return [sp.bos, *ids]  # the model was trained with a BOS the template does not emit
    return ids


def _fix_eos(comp: list[int], sp: _Specials) -> list[int]:
    if sp.eos is None:
        return comp
    if sp.eos not in comp:
        return [*comp, sp.eos]
    if len(comp) >= 2 and comp[-1] == sp.eos and comp[-2] == sp.eos:
        return comp[:-1]
    return comp


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# ---------------------------------------------------------------- the public functions
def _messages(value: Any, what: str, pair_id: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant" if what != "prompt" else "user", "content": value}]
    try:
        return [{"role": m["role"], "content": m["content"]} for m in value]
    except (TypeError, KeyError) as err:
        raise ValueError(f"pair {pair_id!r}: {what} must be a list of {{role, content}} messages, got {value!r:.120}") from err


def _render(tok, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _encode(tok, texts: list[str], *, as_text: bool = False) -> list[list[int]]:
    """``as_text``: special-token strings in ``texts`` become ordinary text tokens, never control ids."""
    return tok(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"] if texts else []


# ---------------------------------------------------------------- data text stays text
_MARK = re.compile("\ue000(\\d+)\ue001")  # a content's placeholder: private-use characters, no template emits them


# the whitespace an added token with lstrip / rstrip takes in (tokenizers uses Rust's char::is_whitespace)
_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")


class _Special(NamedTuple):
    id: int
    content: str
    lstrip: bool  # the tokenizer takes the whitespace before it into the token (it is encoded as nothing)
    rstrip: bool  # ... after it (a turn token such as <|end|> set up so eats the newline the template puts next)
    single_word: bool  # matched only where the characters beside it are no word characters (else it is text)
    normalized: bool  # matched in the normalizer's output (between the other specials), not in the text as written


@dataclass(frozen=True)
class _SpecialTokens:
    """The tokenizer's special added tokens, found where the one-string encoding finds them."""

    pattern: re.Pattern  # their contents as written, longest first (as the tokenizer matches)
    by_content: dict[str, _Special]
    normalizer: Any | None  # the backend's normalizer when a special token is matched in its output, else None
    normalized_pattern: re.Pattern | None  # those tokens' normalized contents (what the tokenizer matches)

    def spelled_in(self, text: str) -> bool:
        """Whether ``text`` spells a special token as written or, normalized, as the tokenizer matches it
        (with a lowercasing normalizer "</S>" is "</s>", with NFKC fullwidth "＜/s＞" too)."""
        if self.pattern.search(text):
            return True
        return self.normalizer is not None and bool(self.normalized_pattern.search(self.normalizer.normalize_str(text)))


def _alternatives(strings: Iterable[str]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(set(strings), key=len, reverse=True)) + ")")


def _special_tokens(tok) -> _SpecialTokens | None:
    """The tokenizer's special added tokens (None when it has none)."""
    found = {t.content: _Special(i, t.content, bool(t.lstrip), bool(t.rstrip), bool(t.single_word), bool(t.normalized))
             for i, t in tok.added_tokens_decoder.items() if t.special}
    if not found:
        return None
    normalizer = tok.backend_tokenizer.normalizer
    normalized = [n for s in found.values() if s.normalized and normalizer is not None
                  and (n := normalizer.normalize_str(s.content))]
    if not normalized:
        return _SpecialTokens(_alternatives(found), found, None, None)
    return _SpecialTokens(_alternatives(found), found, normalizer, _alternatives(normalized))


@functools.cache
def _word_probe():
    """A tokenizer with one added ``single_word`` token, "\ue002": it is matched after a character c
    exactly when the tokenizers library does not count c as a word character."""
    from tokenizers import AddedToken, Tokenizer, models

    probe = Tokenizer(models.WordLevel({"c": 0, "\ue002": 1}, unk_token="c"))
    probe.add_tokens([AddedToken("\ue002", single_word=True, normalized=False)])
    return probe


@functools.lru_cache(maxsize=4096)
def _word_char(c: str) -> bool:
    """Whether a ``single_word`` added token beside ``c`` is not matched (Rust's Unicode ``\\w``; the library
    itself is asked, so letters, digits, "_", combining marks... are exactly its word characters)."""
    return bool(c) and 1 not in _word_probe().encode(c + "\ue002", add_special_tokens=False).ids


def _resolve_single_word(texts: list[str | _Special], normalizer: Any | None) -> list[str | _Special]:
    """``texts`` with each ``single_word`` special the one string would not match turned back into text.

    The tokenizer matches such a token only where the character before it and the one after it are no
    word characters: "flour</s>" keeps "</s>" as text, "flour.</s>" does not.  A token matched as written
    looks at the characters beside it in the whole text; a ``normalized`` one at those of the normalizer's
    output of its stretch between the specials matched as written (those are resolved first).
    """
    out = list(texts)

    def text(t: str | _Special) -> str:
        return t.content if isinstance(t, _Special) else t

    def stretch(k: int, step: int) -> str:
        """The text from ``k`` (exclusive) to the next special matched as written, normalized."""
        j, parts = k + step, []
        while 0 <= j < len(out) and not (isinstance(out[j], _Special) and not out[j].normalized):
            parts.append(text(out[j]))
            j += step
        joined = "".join(parts[::step])
        return normalizer.normalize_str(joined) if normalizer is not None else joined

    for normalized in (False, True):
        for k, t in enumerate(out):
            if not (isinstance(t, _Special) and t.single_word and t.normalized == normalized):
                continue
            if normalized:
                before, after = stretch(k, -1)[-1:], stretch(k, 1)[:1]
            else:
                before, after = "".join(map(text, out[:k]))[-1:], "".join(map(text, out[k + 1:]))[:1]
            if _word_char(before) or _word_char(after):
                out[k] = t.content
    return out


def _normalizes_apart(normalizer: Any, texts: list[str | _Special]) -> bool:
    """Whether each stretch between the specials matched as written normalizes as its parts do one by one.

    The one string normalizes such a stretch whole and finds the ``normalized`` specials in the result;
    the pieces are normalized apart.  Equal for a per-character normalizer (lowercase, NFKC); not for
    Strip (the whitespace beside each special), Prepend (a "▁" before each piece, and the pattern of a
    special, "▁<|end|>", not found in the stretch at all) and their kind: such rows cannot be split honestly.
    """
    stretch: list[str] = []
    for t in [*texts, None]:
        if t is None or (isinstance(t, _Special) and not t.normalized):
            if normalizer.normalize_str("".join(stretch)) != "".join(normalizer.normalize_str(s) for s in stretch):
                return False
            stretch = []
        else:
            stretch.append(t.content if isinstance(t, _Special) else t)
    return True


REWRITES_TEXT = "template_rewrites_text"  # skip reasons of a row spelling a special token (ledger: skipped_<reason>)
NORMALIZER_SPANS_SPECIALS = "normalizer_spans_specials"


def _strips_alike(normalizer: Any | None, special: _Special, text: str, kept: str, strip) -> bool:
    """Whether the whitespace a stripping special takes in as written (``text`` -> ``kept``) is what the one
    string takes in: a ``normalized`` special strips the normalizer's output (``strip``: str.rstrip / lstrip)."""
    return (normalizer is None or not special.normalized
            or normalizer.normalize_str(kept) == strip(normalizer.normalize_str(text), _WHITESPACE))


def _render_pieces(tok, messages: list[dict[str, str]], specials: _SpecialTokens, *,
                   generation_prompt: bool) -> list[str | int] | str:
    """The rendering as [text, special id, text, ...], where only the template's own framing yields ids.

    Each content is rendered as a placeholder that keeps the content's outer whitespace (a
    template that trims it trims the placeholder alike); the special-token strings are found in
    that rendering, where no data text is, then the contents are put back into the text pieces.
    A ``single_word`` special stays text where the one string leaves it text (a word character
    beside it, data or template); the whitespace a special token with lstrip / rstrip takes in, in
    one string, is left out of the pieces beside it (template text or content alike).
    A skip reason instead when the pieces cannot be encoded as the one string is:
    ``REWRITES_TEXT`` when the template changes a content otherwise than by trimming (put back, it
    differs from the real rendering), ``NORMALIZER_SPANS_SPECIALS`` when a ``normalized`` special
    is found in the normalizer's output and that output is not the pieces' outputs side by side.
    """
    cores, marked = [], []
    for k, m in enumerate(messages):
        text = m["content"]
        core = text.strip()
        start = len(text) - len(text.lstrip())
        cores.append(core)
        marked.append({**m, "content": f"{text[:start]}\ue000{k}\ue001{text[start + len(core):]}"})
    rendered = _render(tok, marked, generation_prompt=generation_prompt)
    if _MARK.sub(lambda g: cores[int(g[1])], rendered) != _render(tok, messages, generation_prompt=generation_prompt):
        return REWRITES_TEXT
    texts: list[str | _Special] = []  # the rendering: contents put back, the template's special tokens found
    for i, part in enumerate(_MARK.split(rendered)):
        if i % 2:
            texts.append(cores[int(part)])
        else:
            texts += [specials.by_content[chunk] if j % 2 else chunk
                      for j, chunk in enumerate(specials.pattern.split(part))]
    norm = specials.normalizer
    texts = _resolve_single_word(texts, norm)
    if norm is not None and not _normalizes_apart(norm, texts):
        return NORMALIZER_SPANS_SPECIALS
    pieces: list[str | int] = []
    buf, taker = "", None  # taker: the rstrip special whose whitespace after it is not yet all taken in
    for t in texts:
        if isinstance(t, _Special):
            kept = buf.rstrip(_WHITESPACE) if t.lstrip else buf
            if t.lstrip and not _strips_alike(norm, t, buf, kept, str.rstrip):
                return NORMALIZER_SPANS_SPECIALS
            pieces += [kept, t.id]
            buf, taker = "", (t if t.rstrip else None)
        elif taker is not None:  # whitespace runs on across pieces until the first other character
            buf = t.lstrip(_WHITESPACE)
            if not _strips_alike(norm, taker, t, buf, str.lstrip):
                return NORMALIZER_SPANS_SPECIALS
            taker = None if buf else taker
        else:
            buf += t
    return [*pieces, buf]


def _never_prepend(node: Any) -> bool:
    """Set every Metaspace ``prepend_scheme: "first"`` in a pre-tokenizer's JSON to "never"; True if one was."""
    if isinstance(node, list):
        return any([_never_prepend(n) for n in node])  # a list, not a generator: every one is rewritten
    if not isinstance(node, dict):
        return False
    found = any([_never_prepend(v) for v in node.values() if isinstance(v, (dict, list))])
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
        node["prepend_scheme"] = "never"
        found = True
    return found


def _after_special_encoder(tok):
    """A backend that encodes a text piece as the one-string encoding encodes text following a special token,
    or None when the tokenizer's own backend already does.

    A Metaspace pre-tokenizer with ``prepend_scheme="first"`` (SentencePiece-style: Llama, Mistral) prepends
    "▁" only to text at the start of the string (original offset 0); in one string the text after a special
    token gets none, but encoded alone as a piece it is at the start and would get one (an extra "▁" token
    after every BOS / turn marker).  The copy's Metaspace never prepends: exactly the one-string treatment
    of text at an offset > 0.  "always" / "never" and ByteLevel treat every split alike: no copy needed.
    """
    from tokenizers import Tokenizer

    backend = tok.backend_tokenizer
    if backend.pre_tokenizer is None or b"Metaspace" not in backend.pre_tokenizer.__getstate__():
        return None
    spec = json.loads(backend.to_str())
    if not _never_prepend(spec["pre_tokenizer"]):
        return None
    after = Tokenizer.from_str(json.dumps(spec))
    after.no_truncation()
    after.no_padding()
    after.encode_special_tokens = True  # the pieces are plain text, as _encode(as_text=True) encodes them
    return after


def _encode_renderings(tok, renderings: list[str | list[str | int]]) -> list[list[int]]:
    """Ids of each rendering: a string is encoded as it is, pieces with their text encoded as plain text.

    The first piece of a rendering starts it; every later piece follows one of the template's special
    tokens and is encoded as text there is (``_after_special_encoder``), so the ids of a row whose data
    spells a special token differ from the one-string ids only where that data text is.
    """
    plain = iter(_encode(tok, [r for r in renderings if isinstance(r, str)]))
    pieces = [r for r in renderings if isinstance(r, list)]
    firsts = iter(_encode(tok, [r[0] for r in pieces if r], as_text=True))
    rest = [p for r in pieces for p in r[1:] if isinstance(p, str)]
    after = _after_special_encoder(tok) if rest else None
    rest_ids = iter([e.ids for e in after.encode_batch(rest, add_special_tokens=False)] if after is not None
                    else _encode(tok, rest, as_text=True))
    out = []
    for r in renderings:
        if isinstance(r, str):
            out.append(next(plain))
            continue
        ids: list[int] = []
        for k, p in enumerate(r):
            ids += [p] if isinstance(p, int) else next(firsts) if k == 0 else next(rest_ids)
        out.append(ids)
    return out


def tokenize_rows(tok, rows: Iterable[dict[str, Any]], cfg: TokenizeConfig, ledger: TokenizeLedger | None = None, *,
                  on_mismatch: str = "fail") -> tuple[list[TokenizedPair], TokenizeLedger]:
    """Tokenise DPO rows (dicts with prompt, chosen, rejected, pair_id, optional weight).

    Returns the kept pairs in input order and the ledger.  A pair whose template breaks the
    prefix property raises PrefixMismatchError (``on_mismatch="fail"``) or is skipped and
    recorded as ``skipped_template_mismatch`` with its pair id, side and position (``"skip"``).
    A pair with a special-token string in its text whose template rewrites message contents
    (beyond trimming) is always skipped as ``skipped_template_rewrites_text``, one whose tokenizer
    normalizes across its ``normalized`` specials as ``skipped_normalizer_spans_specials``: it
    cannot be encoded with that text kept as text and the rest as in one string.
    """
    if on_mismatch not in ("fail", "skip"):
        raise ValueError(f"on_mismatch must be 'fail' or 'skip', got {on_mismatch!r}")
    ledger = ledger or TokenizeLedger()
    rows = list(rows)
    sp = _specials(tok)
    specials = _special_tokens(tok)
    renderings: list[str | list[str | int]] = []  # per row: prompt, prompt + chosen, prompt + rejected
    unsplittable: dict[int, str] = {}  # rows spelling a special token that cannot be split honestly: the reason
    for i, r in enumerate(rows):
        pid = str(r["pair_id"])
        prompt = _messages(r["prompt"], "prompt", pid)
        convs = [(prompt, True)] + [(prompt + _messages(r[side], side, pid), False) for side in ("chosen", "rejected")]
        texts = [m["content"] for m in convs[1][0] + convs[2][0][len(prompt):]]  # each data text once
        n_special = sum(1 for t in texts if specials.spelled_in(t)) if specials else 0
        if not n_special:  # the common case: one string per conversation, ids exactly as TRL's
            renderings += [_render(tok, msgs, generation_prompt=gen) for msgs, gen in convs]
            continue
        ledger.counts["special_token_text"] += n_special
        pieces = [_render_pieces(tok, msgs, specials, generation_prompt=gen) for msgs, gen in convs]
        reasons = [p for p in pieces if isinstance(p, str)]
        if reasons:
            unsplittable[i] = reasons[0]
            pieces = [[], [], []]
        renderings += pieces
    enc = _encode_renderings(tok, renderings)

    out: list[TokenizedPair] = []
    for i, r in enumerate(rows):
        pid = str(r["pair_id"])
        ledger.add("rows_in")
        if i in unsplittable:
            ledger.add(f"skipped_{unsplittable[i]}", pid)
            ledger.skipped.append({"pair_id": pid, "reason": unsplittable[i]})
            continue
        raw_prompt = enc[3 * i]
        comps = []
        for j, side in enumerate(("chosen", "rejected")):
            full = enc[3 * i + 1 + j]
            if full[:len(raw_prompt)] != raw_prompt:
                k = _first_difference(raw_prompt, full)
                err = PrefixMismatchError(pid, side, k, tok.decode(raw_prompt[k:k + 8]), tok.decode(full[k:k + 8]))
                if on_mismatch == "fail":
                    raise err
                ledger.add("skipped_template_mismatch", pid)
                ledger.skipped.append({"pair_id": pid, "reason": "template_mismatch", "side": side, "position": k})
                break
            comps.append(_fix_eos(full[len(raw_prompt):], sp))
        if len(comps) < 2:
            continue
        prompt = _fix_bos(raw_prompt, sp)
        weight = 1.0 if r.get("weight") is None else float(r["weight"])
        pair = _truncate(pid, prompt, comps[0], comps[1], weight, cfg, sp, ledger)
        if pair is not None:
            out.append(pair)
    return out, ledger


def _truncate(pid: str, prompt: list[int], chosen: list[int], rejected: list[int], weight: float,
              cfg: TokenizeConfig, sp: _Specials, ledger: TokenizeLedger) -> TokenizedPair | None:
    """Apply the module's truncation policy; record the outcome in the ledger."""
    L = cfg.max_length
    if not chosen or not rejected:
        ledger.add("dropped_empty_completion", pid)
        return None
    if len(prompt) + cfg.min_completion_tokens > L:
        ledger.add("dropped_prompt_too_long", pid)
        return None
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > L and len(prompt) > cfg.prompt_floor:
        keep = max(cfg.prompt_floor, L - longest)
        if sp.bos is not None and prompt[0] == sp.bos:
            prompt = [sp.bos, *prompt[len(prompt) - keep + 1:]]
        else:
            prompt = prompt[len(prompt) - keep:]
        ledger.add("prompt_truncated")
    room = L - len(prompt)
    if longest > room:
        chosen, rejected = chosen[:room], rejected[:room]
        ledger.add("completion_truncated")
    ledger.add("kept")
    return TokenizedPair(pid, tuple(prompt), tuple(chosen), tuple(rejected), weight)


def ledger_summary(ledger: dict[str, Any], split: str) -> str:
    """One line per split for humans: rows in, used, dropped / skipped with reasons and ids, truncated."""
    def reasons(prefix: str) -> str:
        parts = []
        for key, n in ledger.items():
            if key.startswith(prefix) and isinstance(n, int) and n:
                ids = ledger.get("dropped_pair_ids", {}).get(key, [])
                shown = ", ".join(ids[:3]) + (", ..." if n > 3 else "")
                parts.append(f"{key[len(prefix):]} {n}" + (f" ({shown})" if shown else ""))
        return "; ".join(parts)

    dropped = sum(n for k, n in ledger.items() if k.startswith("dropped_") and isinstance(n, int))
    skipped = sum(n for k, n in ledger.items() if k.startswith("skipped_") and isinstance(n, int))
    line = f"{split}: {ledger.get('rows_in', 0)} rows in, {ledger.get('kept', 0)} used, {dropped} dropped"
    if dropped:
        line += f" [{reasons('dropped_')}]"
    line += f", {skipped} skipped"
    if skipped:
        line += f" [{reasons('skipped_')}]"
    line += f", truncated: prompt {ledger.get('prompt_truncated', 0)}, completion {ledger.get('completion_truncated', 0)}"
    if ledger.get("special_token_text"):
        line += f", {ledger['special_token_text']} texts with special-token strings (encoded as plain text)"
    return line
