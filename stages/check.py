"""Stage `check`: the preflight (winnow.preflight) over params.yaml, the recipe, the scale preset,
the evaluation suite and an external pool's presence and schema. It runs first and every other
stage is downstream of it, so a value that would fail inside a stage stops DVC here, before any
stage has removed its outputs. It writes ``data/check/verdict.json`` = ``{"ok": true}`` (the same
bytes every time): what depends on it re-runs only when the verdict changes. A bad value exits 2.
It runs on every ``dvc repro`` (``always_changed``) to fingerprint what params.yaml names outside
DVC's view (an external pool, a recipe's word lists and targets, a scorer checkpoint, an external
evaluation root) into ``data/check/inputs/<stage>.json``, on which each reader depends."""
from winnow.config import Params
from winnow.io import write_json
from winnow.preflight import INPUTS, VERDICT, external_inputs, run
from winnow.stage import main


def body(p: Params) -> dict:
    run("params.yaml")   # a ParamsError listing every problem (exit 2)
    write_json(VERDICT, {"ok": True})
    for consumer, ids in external_inputs(p).items():   # the same bytes while those inputs are unchanged
        write_json(f"{INPUTS}/{consumer}.json", ids)
    return {}


if __name__ == "__main__":
    main("check", body)
