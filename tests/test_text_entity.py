"""DataComp's text-based filter: the text_entity step against DataComp's token loop, the text_based
recipe on the demo pool, its words file's validation, and the script that writes a real one."""
import importlib.util
import sys
import types

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from winnow.config import ROOT, ParamsError
from winnow.filters.engine import load_recipe, run
from winnow.pool import shards
from winnow.pool.view import Pool

# WordNet, as far as these tests go: lowercase form -> the offset of its first synset
WORDNET = {"dog": 1, "dogs": 1, "cat": 2, "cats": 2, "ink": 3, "kite": 4, "hot_dog": 5, "café": 6,
           "circle": 70, "circles": 70, "photo": 71, "a": 72}
IN21K = {1, 2, 3, 4, 5, 6}


def contains_entity(text: str) -> bool:
    """apply_filter.py's does_contain_text_entity, with WORDNET standing in for wordnet.synsets
    (which lowercases its argument with str.lower)."""
    for word in text.split():
        offset = WORDNET.get(word.lower())
        if offset is None:
            continue
        if offset in IN21K:
            return True
    return False


class Batch:
    def __init__(self, texts, chunks=1):
        arr = pa.array(texts, pa.string())
        step = -(-len(texts) // chunks) or 1
        self.text = pa.chunked_array([arr[i:i + step] for i in range(0, len(texts), step)] or [arr], pa.string())

    def arrow(self, name):
        return self.text


@pytest.fixture
def step(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# forms whose first synset is listed\n" + "".join(
        f"{w}\n" for w, o in WORDNET.items() if o in IN21K), encoding="utf-8")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "steps": [{"step": "text_entity", "words": str(words)}]}))
    return load_recipe(str(p)).steps[0]


CAPTIONS = [
    "a dog", "A DOG on grass", "Dogs", "dog,", "(dog)", "dog.", "a hot dog", "hot_dog", "HOT_DOG",
    "a\tdog", "cat\nphoto", "a\u00a0dog", "\u3000cats\u3000", "dog\x1ccircle", "\u0085dog\u2028",
    "dog\u200bcircle",             # zero-width space: not whitespace for str.split, one token
    "", "   ", "\t\n", "a circle", "circles photo", "a", "CAFÉ", "un café", "cafe",
    "\u0130NK",                    # İ: Python lowers it to i + U+0307, no synset ('ink' would match)
    "\u212aITE",                   # Kelvin sign: lowers to k in Python and in Arrow, so 'kite'
    "🐶 dog", "🐶dog", "d\u00f6g", "dog's", "x " * 50 + "cat",
]


def test_step_agrees_with_datacomps_token_loop(step):
    expected = [contains_entity(t) for t in CAPTIONS]
    assert 0 < sum(expected) < len(expected)
    for chunks in (1, 3):         # list_parent_indices over a chunked column: indices of the whole column
        assert step.verdict(Batch(CAPTIONS, chunks)).tolist() == expected
    # DataComp's text.split() raises on a missing caption; here it is dropped
    assert step.verdict(Batch([None, "dog", None])).tolist() == [False, True, False]
    assert step.verdict(Batch([])).tolist() == []


def test_words_file_keys_the_work_and_a_new_version_is_read(step, tmp_path):
    assert step.files() == [step.words]
    assert step.verdict(Batch(["a circle"])).tolist() == [False]
    with open(step.words, "a", encoding="utf-8") as fh:
        fh.write("circle\n")
    assert step.verdict(Batch(["a circle"])).tolist() == [True]


def test_bad_words_file_fails_when_the_recipe_loads(tmp_path):
    def load(words):
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump({"name": "r", "steps": [{"step": "text_entity", "words": str(words)}]}))
        return load_recipe(str(p))

    missing = tmp_path / "no_such_words.txt"
    with pytest.raises(ParamsError, match="no_such_words.txt"):
        load(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("dog\nHot Dog\n")
    with pytest.raises(ParamsError, match=r"bad.txt:2: not one lowercase word") as err:
        load(bad)
    assert "Hot Dog" not in str(err.value)      # a path mistyped onto a secrets file must not print it
    with pytest.raises(ParamsError, match="not a file"):
        load(tmp_path)                          # a directory (or /dev/zero) is not read
    bom = tmp_path / "bom.txt"
    bom.write_text("\ufeffdog\n", encoding="utf-8")
    from winnow.filters.text import entity_words

    assert entity_words(str(bom)).to_pylist() == ["dog"]


def test_text_based_recipe_on_the_demo_pool(demo_pool, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)          # recipes name their files from the project root
    recipe = load_recipe("text_based")
    assert [s.kind for s in recipe.steps] == ["text_entity", "language"]
    f = run(recipe, Pool.open(str(demo_pool)), str(tmp_path))
    assert recipe.bounds.min_fraction < f["kept_fraction"] < recipe.bounds.max_fraction
    d = pd.read_parquet(tmp_path / "decisions.parquet")
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    text = meta.set_index("uid").loc[d.uid, "text"]
    lines = (ROOT / recipe.steps[0].words).read_text().splitlines()
    words = {w for w in lines if w and not w.startswith("#")}
    expected = [any(w.lower() in words for w in t.split()) for t in text]
    assert (d["keep:text_entity"].to_numpy() == np.array(expected)).all()
    kept = d["keep:text_entity"].to_numpy() & (d["keep:language"].to_numpy() == 1)
    assert kept.sum() == f["kept_unique"] > 0


# --- tools/text_entity_words.py ----------------------------------------------------------------

TOOL = ROOT / "tools" / "text_entity_words.py"


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("text_entity_words", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeWordNet:
    """Lemma names, an exception list and synsets(): the lowercased form's synset offsets, in order."""
    SYNSETS = {"dog": [1], "dogs": [1], "box": [2], "boxes": [2], "berry": [3], "berries": [3],
               "taxi": [4], "taxis": [90, 4],          # 'taxis' is a lemma of its own: its first synset is not the cab
               "goose": [5], "geese": [5], "hot_dog": [6], "run": [8], "runs": [8],   # 8: a verb synset's offset
               "circle": [70], "circles": [70], "bake": [9], "baking": [9], "baked": [9]}
    _exception_map = {"n": {"geese": ["goose"]}, "v": {}, "a": {}, "r": {}}

    class Synset:
        def __init__(self, offset):
            self._offset = offset

        def offset(self):
            return self._offset

    def all_lemma_names(self):
        return iter(["dog", "box", "berry", "taxi", "taxis", "goose", "hot_dog", "Run", "circle", "bake"])

    def synsets(self, word):
        return [self.Synset(o) for o in self.SYNSETS.get(word.lower(), [])]


def test_generator_parses_and_reads_datacomps_wnids(tool):
    import ast

    ast.parse(TOOL.read_text())
    assert tool.read_wnids(["n01440764\n", "\n", "n00000005 \n"]) == {1440764, 5}


def test_generator_writes_forms_whose_first_synset_is_listed(tool):
    wn = FakeWordNet()
    cands = tool.candidates(wn)
    assert {"dogs", "boxes", "berries", "geese", "runs", "baking", "baked", "hot_dog", "run"} <= cands
    assert "running" not in cands       # no rule doubles a consonant: a lemma of its own in WordNet
    assert tool.entity_words(wn, {1, 2, 3, 4, 5, 6, 8, 9}) == [
        "bake", "baked", "baking", "berries", "berry", "box", "boxes", "dog", "dogs", "geese", "goose",
        "hot_dog", "run", "runs", "taxi"]


def test_generator_main_writes_a_file_the_step_reads(tool, tmp_path, monkeypatch, capsys):
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = FakeWordNet()
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    wnids = tmp_path / "imagenet21k_wordnet_ids.txt"
    wnids.write_text("n00000001\nn00000004\n")
    tool.main([str(wnids)])
    words = tmp_path / "words.txt"
    words.write_text(capsys.readouterr().out)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "steps": [{"step": "text_entity", "words": str(words)}]}))
    s = load_recipe(str(p)).steps[0]
    assert s.verdict(Batch(["Dogs!", "two DOGS", "a taxi", "taxis", "a box"])).tolist() == [
        False, True, True, False, False]
