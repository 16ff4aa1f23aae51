"""Stage `plan`: validate the recipe against the pool and decide what must be computed for it —
whether a scorer is needed and which encodings the embed stage makes. Its output changes only when
that verdict does, so `scorer` and `embed` (which depend on it) re-run only then; the recipe's
inputs and where each comes from go to reports/validation/plan.json through the gate."""
import pandas as pd

from winnow import models
from winnow.config import Params
from winnow.filters.engine import params_recipe
from winnow.io import write_json
from winnow.plan import needs
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.validate import Gate, expect

OUT = "data/plan/needs.json"
SCORER = "data/plan/scorer.json"


def body(p: Params) -> dict:
    recipe = params_recipe(p.filter)
    name = models.embedding_name(p.scorer.model, p.scorer.pretrained, p.scorer.name)
    verdict, rows = needs(recipe, Pool.open("data/pool"), name)
    gate = Gate("plan")
    if rows:
        gate.check("inputs", pd.DataFrame(rows), [
            expect().ExpectColumnValuesToBeInSet(column="from", value_set=["pool", "embed"])], id_column="input")
    gate.finish()
    write_json(OUT, verdict)
    # the scorer's own input: whether one is needed at all (which encodings is the embed stage's
    # business), so a recipe that changes only the encodings never re-runs the scorer
    write_json(SCORER, {"scorer": verdict["scorer"]})
    return {"scorer_needed": int(verdict["scorer"]), "encodings": len(verdict["encode"])}


if __name__ == "__main__":
    main("plan", body)
