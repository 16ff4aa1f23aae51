"""Write the words file of the ``text_entity`` step (DataComp's text-based filter) from NLTK's WordNet.

DataComp keeps a caption if some token ``t`` of ``text.split()`` has
``wordnet.synsets(t)[0].offset()`` in its ImageNet-21k synset list (``imagenet21k_wordnet_ids``,
lines ``n01440764``). That is a property of the lowercased token alone (``synsets`` lowercases,
then undoes inflections with morphy), so it can be tabulated once, where WordNet is installed::

    python tools/text_entity_words.py imagenet21k_wordnet_ids.txt > configs/text_entity/in21k_words.txt

Candidates: every WordNet lemma name, lowercased (a multi-word lemma keeps its underscores:
``hot_dog`` is one whitespace token and has synsets), each inflected by inverting every morphy
substitution rule (``dog`` -> ``dogs``, ``box`` -> ``boxes``, ``berry`` -> ``berries``,
``bake`` -> ``baking``, ``man`` -> ``men`` …), plus the forms of WordNet's exception lists (``geese``).
A candidate is written iff its first synset's offset is in the list — the very test DataComp runs,
so a verb or adjective synset whose offset equals a listed noun's counts too, as it does there.
The remaining divergence: a token outside the candidate set that morphy still resolves (it applies
its rules repeatedly, e.g. ``dogss``) is not in the file, and is not matched.
"""
from __future__ import annotations

import argparse
import sys

# nltk's WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS, used where the reader lacks it
SUBSTITUTIONS = {"n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                       ("shes", "sh"), ("men", "man"), ("ies", "y")],
                 "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                       ("ing", "")],
                 "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")]}


def read_wnids(lines) -> set[int]:
    """``n01440764`` -> 1440764, as DataComp's ``int(x[1:])``; blank lines skipped."""
    return {int(x.strip()[1:]) for x in lines if x.strip()}


def candidates(wordnet) -> set[str]:
    """Lemma names and the forms morphy maps back to them in one rule, or by its exception lists."""
    subs = getattr(wordnet, "MORPHOLOGICAL_SUBSTITUTIONS", SUBSTITUTIONS)
    rules = {(old, new) for pairs in subs.values() for old, new in pairs}
    out = set()
    for name in wordnet.all_lemma_names():
        base = name.lower()
        if " " in base:
            continue
        out.add(base)
        out.update(base[:len(base) - len(new)] + old for old, new in rules if base.endswith(new))
    for forms in getattr(wordnet, "_exception_map", {}).values():
        out.update(f.lower() for f in forms if " " not in f)
    return out


def entity_words(wordnet, wnids: set[int]) -> list[str]:
    """The candidates whose first synset (``synsets(w)[0]``, as DataComp takes it) is listed."""
    keep = []
    for w in sorted(candidates(wordnet)):
        synsets = wordnet.synsets(w)
        if synsets and synsets[0].offset() in wnids:
            keep.append(w)
    return keep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wnids", help="ImageNet-21k synset ids, one n######## a line (DataComp's imagenet21k_wordnet_ids)")
    args = ap.parse_args(argv)
    from nltk.corpus import wordnet

    with open(args.wnids, encoding="utf-8") as fh:
        words = entity_words(wordnet, read_wnids(fh))
    sys.stdout.write(f"# text_entity words: {len(words)} forms whose first WordNet synset is in {args.wnids}\n")
    sys.stdout.write("".join(w + "\n" for w in words))


if __name__ == "__main__":
    main()
