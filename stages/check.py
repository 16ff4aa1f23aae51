"""Stage `check`: the preflight (winnow.preflight) over params.yaml, the recipe, the scale preset,
the evaluation suite and an external pool's presence and schema. It runs first and every other
stage is downstream of it, so a value that would fail inside a stage stops DVC here, before any
stage has removed its outputs. It writes ``data/check/verdict.json`` = ``{"ok": true}`` (the same
bytes every time): what depends on it re-runs only when the verdict changes. A bad value exits 2."""
from winnow.config import Params
from winnow.io import write_json
from winnow.preflight import VERDICT, run
from winnow.stage import main


def body(p: Params) -> dict:
    run("params.yaml")   # a ParamsError listing every problem (exit 2)
    write_json(VERDICT, {"ok": True})
    return {}


if __name__ == "__main__":
    main("check", body)
