"""A recipe as a verb: ``run`` (stages, an export per target, checks, profiles, gates, the report).
``compress run`` calls exactly this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompress.compress.api.inputs import workdir_for
from edgecompress.compress.api.result import Result


def run(recipe: Any, *, workdir: str | Path | None = None, auto: bool = False, allow_code: bool = False,
        allow_failed: bool = False, baseline: str | Path | None = None) -> Result:  # fmt: skip
    """Run a recipe: its stages, an export per target, checks, profiles, gates and the report.

    Args:
        recipe: a recipe file, its dict, or a ``Recipe``.
        workdir: the run folder (stages, artifacts, report); rerunning into it resumes.
        auto: try candidate chains within the budgets and pick the best.
        allow_code: let the recipe's model factory import Python code.
        allow_failed: take a model checkpoint whose accuracy guard failed.
        baseline: a previous run folder (or its summary.json) to judge this run against.

    Raises:
        GateFailure: a gate failed (everything is written first; the summary is in ``workdir``).

    Example:
        >>> ec.run("examples/demo.yaml", workdir="demo-out/").summary["results"][0]["metrics"]  # doctest: +SKIP
    """
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.pipeline import run_recipe
    from edgecompress.compress.recipe import Recipe, load_recipe, parse_recipe

    r = recipe if isinstance(recipe, Recipe) else (parse_recipe(recipe) if isinstance(recipe, dict) else load_recipe(recipe))
    out = workdir_for("run", workdir)
    if baseline is not None and auto:
        raise ConfigError("--baseline judges a plain run; with --auto, compare the chosen candidate's run folder "
                          "with: compress compare BASE RUN")  # fmt: skip
    if auto:
        from edgecompress.compress.auto import run_auto

        summary = run_auto(r, out, allow_code=allow_code, allow_failed=allow_failed)
    else:
        summary = run_recipe(r, out, allow_code=allow_code, allow_failed=allow_failed, baseline=baseline)
    return Result("run", metrics=summary, summary=summary, paths={"workdir": out, "report": out / "report.md"})
