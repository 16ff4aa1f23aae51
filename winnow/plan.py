"""What a recipe needs that the pool lacks, decided before any model is loaded.

The `plan` stage writes this verdict; `scorer` and `embed` depend on its file, not on the recipe,
so a new recipe re-runs them only when it changes what must be computed. A recipe declares its
needs through its steps' ``requires()`` (columns and embedding keys): whatever the pool already has
(DataComp's metadata columns and its ``b32_*``/``l14_*`` npz) is read from the pool; what it lacks
must be one of the embed stage's products for the scorer, ``<name>_img``, ``<name>_img_flip``,
``<name>_txt``, ``<name>_score``, ``<name>_flip_score`` — or the recipe cannot run, and this says so
before anything is computed. Alignment steps whose targets are task data need the scorer too (the
targets are embedded with it) unless they read a targets file.
"""
from __future__ import annotations

from winnow.config import ParamsError
from winnow.pool.view import Pool

# each embed product and the image/text encodings it is made of
PRODUCTS = {"img": {"img"}, "img_flip": {"flip"}, "txt": {"txt"}, "score": {"img", "txt"},
            "flip_score": {"flip", "txt"}}


def needs(recipe, pool: Pool, name: str) -> tuple[dict, list[dict]]:
    """The verdict ``{"scorer": bool, "encode": [img|flip|txt], "targets": bool, "name": name}`` and
    one row per input a step reads, with where it comes from (``pool`` or ``embed``)."""
    batch = pool.batch(pool.shards[0])
    have = set(batch.columns()) | set(batch.embedding_keys())
    products = {f"{name}_{suffix}": parts for suffix, parts in PRODUCTS.items()}
    encode: set[str] = set()
    rows, problems = [], []
    for lab, step in zip(recipe.labels(), recipe.steps):
        cols, keys = step.requires()
        for x in [*cols, *keys]:
            if x in have:
                rows.append({"step": lab, "input": x, "from": "pool"})
            elif x in products:
                encode |= products[x]
                rows.append({"step": lab, "input": x, "from": "embed"})
            else:
                kind = "column" if x in cols else "embedding"
                problems.append(f"step '{lab}' needs {kind} '{x}': the pool lacks it and the scorer's "
                                f"embed stage makes only {', '.join(sorted(products))}")
    if problems:
        raise ParamsError(f"recipe '{recipe.name}' cannot run on this pool:\n  " + "\n  ".join(problems))
    targets = any(_task_targets(leaf, recipe.targets) for s in recipe.steps for leaf in s.leaves())
    verdict = {"scorer": bool(encode or targets), "encode": sorted(encode), "targets": targets,
               "name": name if encode or targets else None}
    return verdict, rows


def _task_targets(step, files: dict) -> bool:
    """An alignment step whose targets are task data the scorer must embed: any step that reads
    text targets, or image targets of a task the recipe names no embeddings file for."""
    if step.kind not in ("retrieval", "image_clusters"):
        return False
    if "text" in (getattr(step, "queries", None) or []):
        return True
    tasks = getattr(step, "tasks", None)
    return tasks is None and not files or tasks is not None and not set(tasks) <= set(files)
