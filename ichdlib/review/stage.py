"""Stage 06, the review, as one entry (:data:`ichdlib.stages.STAGES`): the pointing game of the first
backbone's CAMs. Its own module so that the review's helpers (``pointing``, ``plots``) that ``ichd predict``
uses do not reach the catalog code (and through it the phantom)."""

from __future__ import annotations

import pandas as pd

from ichdlib.config import Params
from ichdlib.review.cases import review_table
from ichdlib.review.engine import CamEngine
from ichdlib.review.pointing import pointing_game_run
from ichdlib.stages import StageReport


def run_stage(P: Params, force: bool = False, *, engine: CamEngine | None = None,
              table: pd.DataFrame | None = None) -> StageReport:
    """Stage 06: the pointing game of the first backbone's CAMs (the review's
    figures are the notebook's); the report's ``result`` is :func:`pointing_game_run`'s (None without masks)."""
    engine = engine if engine is not None else CamEngine(P)
    table = table if table is not None else review_table(P, engine.key, engine.catalog)
    pg = pointing_game_run(P, engine, table, force=force)
    rows = [] if pg is None else [{"label": k, "TP hit rate": v, "slices": (pg.get("n") or {}).get(k)}
                                  for k, v in pg["per_class"].items()]
    return StageReport("review", rows, result=pg)
