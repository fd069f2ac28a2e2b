"""Build the repo's tiny chat tokenizer: ``trainer/assets/tiny-chat-tokenizer/``.

A byte-level BPE (GPT-2 style: any UTF-8 text round-trips, no unknown token) trained with
the ``tokenizers`` library on every string in ``data/source/*.jsonl`` (English, Chinese and
Japanese prompts and replies), so tests, benchmarks and the tiny random-init models need no
download.  The output loads offline with
``transformers.AutoTokenizer.from_pretrained("trainer/assets/tiny-chat-tokenizer")``.

Special tokens (fixed ids, first in the vocabulary)::

    0 <|pad|>       padding only, never inside a sequence
    1 <|bos|>       emitted once by the chat template, at the very start
    2 <|im_end|>    end of a turn = EOS (an assistant turn ends with it)
    3 <|im_start|>  start of a turn, followed by the role and a newline

Chat template (ChatML with a BOS)::

    <|bos|><|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

``add_generation_prompt`` appends ``<|im_start|>assistant\\n``, so the rendered prompt is a
prefix of the rendered prompt + reply (the property ``trainer.tokenize`` checks).  The
tokenizer itself adds no special tokens (no post-processor template): the chat template
is the only source of BOS/EOS, so nothing is duplicated.

Deterministic: the same source files give the same ``tokenizer.json`` (the BPE trainer is
single-threaded here and the input order is fixed).  Rebuild with
``python trainer/assets/build_tokenizer.py`` and commit the output (< 1 MB).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_GLOB = "data/source/*.jsonl"
OUT_DIR = Path(__file__).resolve().parent / "tiny-chat-tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj):
            if k not in ("id", "role", "source_item_id"):
                yield from _strings(obj[k])
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def source_texts(root: Path = ROOT) -> list[str]:
    texts = []
    for path in sorted(root.glob(SOURCE_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    # the role names the chat template renders, so they become single tokens
    return texts + ["user", "assistant", "system"] * 50


def build(vocab_size: int = 3072, out_dir: Path = OUT_DIR) -> Path:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(source_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # One file for the template: transformers 5 writes chat_template.jinja, older loaders read the
    # "chat_template" key of tokenizer_config.json; both versions read the key.
    jinja = out_dir / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4.x and 5.x both resolve
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=3072)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    out = build(args.vocab_size, args.out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB): {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
