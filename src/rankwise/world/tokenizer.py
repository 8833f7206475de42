"""A word-level tokenizer for the world, built with ``tokenizers``.

Words and punctuation marks are tokens (``Whitespace`` pre-tokenizer); decoding joins
them with spaces and removes the space before punctuation, so world text round-trips
exactly. It is saved as a ``PreTrainedTokenizerFast`` directory, so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_tokenizer(texts: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    Token ids: the special tokens first (``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2,
    ``</s>`` = 3), then the words sorted by decreasing count (ties alphabetically), so
    the result does not depend on the order of ``texts``.
    """
    from transformers import PreTrainedTokenizerFast  # heavy at import: transformers

    pre = pre_tokenizers.Whitespace()
    counts: Counter = Counter()
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
        counts.update(w for w, _ in pre.pre_tokenize_str(t))
    if not counts:
        raise ValueError("texts is empty: cannot build a vocabulary")
    specials = list(SPECIAL_TOKENS.values())
    words = sorted((w for w in counts if w not in specials), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    # WordPiece's decoder with cleanup: joins with spaces, then "a ." -> "a." etc.
    # A Replace step does the same for ":" (not in WordPiece's cleanup list).
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True),
                                     decoders.Replace(" :", ":")])
    # Add <s> in front of every encoded sequence (like Llama tokenizers do).
    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B",
        special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "left"  # decoder-only generation pads on the left
    fast.model_max_length = 1024
    return fast


def save_tokenizer(tokenizer, out_dir) -> None:
    """Save with ``save_pretrained`` (``tokenizer.json`` + config) so ``AutoTokenizer`` loads it."""
    tokenizer.save_pretrained(str(out_dir))
