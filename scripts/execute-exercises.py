"""Execute only a chapter's exercises, in full mode, and store their outputs in its notebook.

Usage: python scripts/execute-exercises.py STEM [STEM ...]   (run through `make exercises NB=STEM`)

A chapter's exercises are its last section, from the markdown cell with the heading "## Exercises" to the
end. They are written to be self-contained: besides their own cells they may use only the setup cell (the
first code cell) and the device cell (the code cell that calls `select_device(`). This script runs exactly
those cells in a fresh kernel, so an exercise that leans on a variable from the chapter's body fails here
instead of passing by accident; its outputs then replace the stored ones of the exercise cells, and every
other cell keeps the outputs of the chapter's full run. Re-running a long chapter to add an exercise would
take minutes of training for outputs that do not change. nbval still executes each chapter top to bottom.
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

CHAPTERS = Path(__file__).resolve().parent.parent / "book" / "chapters"
HEADING = "## Exercises"


def exercises_start(nb: nbformat.NotebookNode) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and HEADING in cell.source.splitlines():
            return i
    raise SystemExit(f"no markdown cell with the heading {HEADING!r}")


def prelude(nb: nbformat.NotebookNode, start: int) -> list[int]:
    """The setup cell and the device cell (if any) before the exercises."""
    code = [i for i in range(start) if nb.cells[i].cell_type == "code"]
    if not code:
        raise SystemExit("no setup cell before the exercises")
    device = [i for i in code if "select_device(" in nb.cells[i].source]
    return sorted({code[0], *device[:1]})


def execute_exercises(stem: str, timeout: int) -> None:
    path = CHAPTERS / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    start = exercises_start(nb)
    chosen = prelude(nb, start) + list(range(start, len(nb.cells)))
    sub = copy.deepcopy(nb)
    sub.cells = [copy.deepcopy(nb.cells[i]) for i in chosen]
    NotebookClient(sub, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(CHAPTERS)}}).execute()
    # Execution counts continue the chapter's own, as if the exercises had run at the end of its full run.
    count = max((c.get("execution_count") or 0 for c in nb.cells[:start] if c.cell_type == "code"), default=0)
    for i, ran in zip(chosen, sub.cells, strict=True):
        if i < start or ran.cell_type != "code":
            continue
        count += 1
        for out in ran.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
        nb.cells[i].outputs = ran.outputs
        nb.cells[i].execution_count = count
    nbformat.write(nb, path)
    print(f"{stem}: {sum(1 for i in chosen if i >= start and nb.cells[i].cell_type == 'code')} exercise "
          "cell(s) executed in full mode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stems", nargs="+", help="chapter stems, e.g. 03_gaussian_kl")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    # Stored outputs come from full runs.
    os.environ.pop("VAELIB_QUICK", None)
    for stem in args.stems:
        execute_exercises(stem, args.timeout)


if __name__ == "__main__":
    main()
