"""Tokenizers of the offline models, built from a small English word list (colours, shapes, common prompt words).

Every listed word is one token, so the random text encoders of a tiny model still see a prompt word by word:

* :func:`build_clip_tokenizer`: a byte-level BPE :class:`~transformers.CLIPTokenizer` whose merges turn every
  listed word into a single token; other words fall back to characters, so no input can fail to tokenize.
* :func:`build_t5_tokenizer`: a unigram :class:`~transformers.T5Tokenizer` with one piece per listed word plus
  single letters/digits/punctuation as fallback; anything else maps to ``<unk>``.
* :func:`build_qwen_tokenizer`: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (Qwen2's pre-tokenizer) whose
  merges make every listed word and every word of the Qwen-Image prompt template, with and without a leading space,
  one token; the chat special tokens are added tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CLIP_MAX_LENGTH",
    "QWEN_SPECIAL_TOKENS",
    "build_clip_tokenizer",
    "build_qwen_tokenizer",
    "build_t5_tokenizer",
    "greedy_bpe_merges",
    "vocab_words",
]

CLIP_MAX_LENGTH: int = 77
"""Length the SD3 and FLUX pipelines pad CLIP prompts to (``tokenizer.model_max_length``), as with real CLIP."""

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""The Qwen2.5-VL special tokens the tiny Qwen-Image text encoder's config names (the first is the BPE's own)."""

_WORDS = """
a an the of on in with and or at to from by for over under above below behind next near into onto is are
it its this that some very no not one two three four five many few half
red green blue yellow white black orange purple pink brown gray grey cyan magenta violet gold golden silver
teal navy beige maroon olive lime turquoise indigo crimson scarlet color colors colour colours colored
coloured colorful colourful monochrome grayscale rainbow
bright dark light pale deep vivid vibrant saturated muted faded dull shiny glowing warm cool hot cold
big small large tiny huge little wide narrow tall short thick thin round square circle circles disc disk
dot dots rectangle rectangles triangle triangles stripe stripes striped line lines ring star heart shape
shapes block blocks box cube ball sphere pattern checkerboard grid border frame edge
solid plain simple smooth soft sharp blurry gradient flat textured empty filled uniform single double
left right top bottom center centre middle corner corners side upper lower background foreground
image images photo photograph picture painting drawing sketch illustration render art icon logo scene view
close up sky sun moon star stars cloud clouds sea ocean water lake river grass tree trees forest flower
flowers leaf leaves apple banana orange cherry lemon fire snow ice sand stone rock night day sunset sunrise
cat dog bird fish car house road city mountain field wall floor paper
high quality detailed beautiful realistic abstract minimal minimalist style
"""

# Words of the Qwen-Image pipeline's prompt template (with their casing) that are not in the word list.
_QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe describe detailing size texture quantity text spatial relationships objects"
)


def vocab_words() -> list[str]:
    """The word list, sorted and without repeats."""
    return sorted(set(_WORDS.split()))


def greedy_bpe_merges(symbol_sequences: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Greedy BPE over the given symbol sequences (each counted once) until every sequence is one symbol.

    The most frequent adjacent pair is merged first, ties broken by the pair itself, so the merges are deterministic
    and re-applying them in rank order turns every training sequence into a single symbol.
    """
    seqs = [list(seq) for seq in symbol_sequences]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq[:-1], seq[1:], strict=True):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            merged: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    merged.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            seqs[i] = merged


def _with_merged_symbols(tokens: list[str], merges: Sequence[tuple[str, str]]) -> list[str]:
    """``tokens`` followed by the product of every merge, in merge order, each once (a BPE vocabulary)."""
    tokens = list(tokens)
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    return tokens


def _check_single_tokens(tokenizer, texts: Sequence[str], name: str) -> None:
    bad = [text for text in texts if len(tokenizer(text, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"tiny {name} tokenizer splits vocabulary words: {bad[:10]}")


def build_clip_tokenizer():
    """A byte-level BPE :class:`~transformers.CLIPTokenizer` over the word list (``model_max_length`` 77).

    Symbols follow the CLIP convention: the last character of a word carries the ``</w>`` suffix.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    words = vocab_words()
    merges = greedy_bpe_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in words])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = _with_merged_symbols(alphabet + [c + "</w>" for c in alphabet], merges)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    _check_single_tokens(tokenizer, words, "CLIP")
    return tokenizer


def build_t5_tokenizer(extra_words: Sequence[str] = ()):
    """A unigram :class:`~transformers.T5Tokenizer` with one piece per word of the word list (and of
    ``extra_words``: a family's own words, e.g. the tiny Wan's "turning", without changing the other builds).

    A lowercasing normalizer would not survive ``save_pretrained``/``from_pretrained`` (the class rebuilds the
    backend from the vocabulary), so upper-case letters are single-character fallback pieces instead.
    """
    import string

    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -6.0)]
    words = vocab_words() + sorted(set(extra_words) - set(vocab_words()))
    pieces += [("\u2581" + w, -3.0) for w in words]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _qwen_pieces(texts: Sequence[str]) -> list[str]:
    """The byte-level pre-tokens (Qwen2's split: words with their leading space, punctuation runs, contractions,
    newlines) of ``texts``, special tokens taken out: what must be single tokens for each pre-token of these texts to
    be one token, as with the real Qwen2.5 vocabulary."""
    import re

    from transformers import Qwen2Tokenizer

    # Any Qwen2Tokenizer has Qwen2's pre-tokenizer, whatever its vocabulary.
    splitter = Qwen2Tokenizer(vocab={"a": 0}, merges=[]).backend_tokenizer.pre_tokenizer
    special = "|".join(re.escape(token) for token in QWEN_SPECIAL_TOKENS)
    pieces: set[str] = set()
    for text in texts:
        for part in re.split(special, text):
            pieces.update(piece for piece, _ in splitter.pre_tokenize_str(part) if len(piece) > 1)
    return sorted(pieces)


def build_qwen_tokenizer(extra_texts: Sequence[str] = ()):
    """A byte-level BPE :class:`~transformers.Qwen2Tokenizer` over the word list and the template words.

    ``extra_texts`` (a prompt template, say): each of their pre-tokens becomes one token too. Without them the
    vocabulary is the text-to-image one, unchanged.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    words = sorted(set(vocab_words()) | set(_QWEN_TEMPLATE_WORDS.split()))
    # Byte-level symbols: ASCII letters map to themselves, a leading space to "Ġ".
    forms = words + ["\u0120" + w for w in words]
    forms += [piece for piece in _qwen_pieces(extra_texts) if piece not in set(forms)]
    merges = greedy_bpe_merges(forms)
    tokens = _with_merged_symbols(sorted(pre_tokenizers.ByteLevel.alphabet()), merges)
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.padding_side = "right"
    _check_single_tokens(tokenizer, [form.replace("\u0120", " ") for form in forms], "Qwen")
    return tokenizer
