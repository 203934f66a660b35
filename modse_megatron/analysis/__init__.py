"""Research tools over pretraining runs.

* ``modse-analyze`` (:mod:`.analyze`): what diverse expert sizes do in one run - token share per
  expert width (:mod:`.run_log`, from ``metrics.jsonl``), difficulty x width, router entropy,
  routing stability, per-EP-rank compute and topic specialisation (:mod:`.routing`,
  :mod:`.topics`, on the exported model), statistics in :mod:`.stats`, plots and markdown in
  :mod:`.report`.
* ``modse-ablate`` (:mod:`.ablate`): grids of runs x seeds -> one table with intervals.
"""


class AnalysisError(ValueError):
    """Input ``modse-analyze`` cannot use; the message (one line) names the problem and the fix."""
