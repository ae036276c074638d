"""Import the notebook's `#| export` cells as a module, without running any training.

    from nbmodule import load_notebook
    nb = load_notebook()          # cached per process
    nb.frechet_distance(...)

`python tests/nbmodule.py --check-settings` validates the settings (notebook parameters + environment) and
exits 2 with one line per bad setting; reproduce.sh runs it before executing the notebook.
"""
import sys
import types
from functools import lru_cache
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebook.ipynb"


def _cells(path):
    return nbformat.read(str(path), as_version=4).cells


@lru_cache(maxsize=None)
def load_notebook(path=NOTEBOOK):
    module = types.ModuleType("notebook_exports")
    module.__file__ = str(path)
    sys.modules["notebook_exports"] = module  # dataclasses look their module up here
    for cell in _cells(path):
        if cell.cell_type == "code" and cell.source.lstrip().startswith("#| export"):
            exec(compile(cell.source, f"{path.name}:export-cell", "exec"), module.__dict__)
    return module


def notebook_parameters(path=NOTEBOOK):
    """The defaults in the cell tagged `parameters` (papermill's convention), as a dict."""
    for cell in _cells(path):
        if "parameters" in cell.metadata.get("tags", []):
            values = {}
            exec(cell.source, {}, values)
            return values
    raise LookupError(f"{path}: no cell tagged 'parameters'")


def check_settings():
    import os
    nb = load_notebook()
    try:
        settings = nb.resolve_settings(notebook_parameters(), os.environ)
        nb.selected_models(settings)
    except nb.SettingsError as err:
        for line in str(err).splitlines():
            print(f"settings error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-settings"]:
        sys.exit(check_settings())
    sys.exit("usage: python tests/nbmodule.py --check-settings")
