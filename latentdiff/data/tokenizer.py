"""A word-level `transformers.CLIPTokenizer` for a closed vocabulary, built offline (no hub download).

CLIP's tokenizer is a byte-level BPE: a word is split into byte characters, the last one marked `</w>`, and merges
are applied lowest rank first. `build_word_tokenizer` writes CLIP's two files (`vocab.json`, `merges.txt`) so that
every word of the given vocabulary becomes one token, while any other text still tokenizes (every byte character,
alone and word-final, and every merge result are in the vocabulary: nothing is ever unknown). The result loads
with `CLIPTokenizer.from_pretrained(folder)` like any CLIP tokenizer and is saved with the model it belongs to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE pieces of one word under `ranks` (the algorithm CLIPTokenizer runs)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_word_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77):
    """Write `vocab.json` and `merges.txt` into `folder` so each of `words` is one token; return the loaded
    `CLIPTokenizer` (padding to `model_max_length`, CLIP's lower-casing pre-tokenizer).

    Merges are added word by word, left to right from where the merges so far leave the word, until every word is a
    single piece: a later word's merges never split an earlier one, because they only ever join pieces that the
    earlier merges could not join.
    """
    from transformers import CLIPTokenizer

    words = list(dict.fromkeys(w.lower() for w in words))
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(len(words) + 1):  # each pass makes at least one more word whole, or stops
        split = [w for w in words if len(_apply_merges(w, ranks)) > 1]
        if not split:
            break
        for word in split:
            pieces = _apply_merges(word, ranks)
            merged = pieces[0]
            for piece in pieces[1:]:
                ranks.setdefault((merged, piece), len(ranks))
                merged += piece
                vocab.setdefault(merged, len(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


# A byte-level BPE vocabulary this small is a word list (build_word_tokenizer: 514 byte tokens, 2 special tokens and
# one token per merge; the embedded default has 610), not a general-purpose one (CLIP's has 49,408 tokens).
CLOSED_VOCABULARY_MAX_TOKENS = 4096


def closed_vocabulary(tokenizer) -> frozenset[str] | None:
    """The words a word-level tokenizer (`build_word_tokenizer`'s) holds whole, or None for an open vocabulary.

    In a closed vocabulary a word outside the list still tokenizes, as letter pieces the text encoder never saw in
    training, so the model cannot follow it; in an open one (CLIP's) any word is made of trained pieces.
    """
    vocab = tokenizer.get_vocab()
    if len(vocab) > CLOSED_VOCABULARY_MAX_TOKENS:
        return None
    return frozenset(token.removesuffix("</w>") for token in vocab if token.endswith("</w>"))


def unknown_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """The words of `text` (lower-cased, split at anything not a letter or digit) not in `vocabulary`, in order."""
    words = re.findall(r"[^\W_]+", text.lower())
    return list(dict.fromkeys(w for w in words if w not in vocabulary))
