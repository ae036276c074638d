"""The notebook as a file people live in: no outputs committed, every setting documented from its one source,
no profile or name dispatch outside the records."""
import json
import re
import symtable
from pathlib import Path

from nbmodule import NOTEBOOK, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def code_cells():
    return ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def test_the_committed_notebook_has_no_outputs():
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:80]


def test_the_readme_settings_table_is_the_one_generated_from_the_parameters_cell(nb):
    table = settings_table()
    assert table in README.read_text(), "README's settings table is stale: paste `python tests/nbmodule.py --settings-table`"
    documented = re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.M)
    assert documented == list(nb.RULES)  # every setting has its rule, in the parameters cell's order


def test_no_code_outside_the_records_dispatches_on_a_profile_or_a_name(nb):
    code = "\n".join(code_cells())
    assert not re.search(r"profile\s*(==|!=)\s*(?!\"auto\")\S|\.profile\s+in\b|profile\]\s*==", code)
    names = "|".join(list(nb.STUDIES) + list(nb.MODEL_REGISTRY) + list(nb.PROFILES))
    assert not re.search(rf"== \"({names})\"", code)   # studies, models, profiles: their records say it
    assert not re.search(r"\.loss == \"", code)          # GAN losses come from GAN_LOSSES


def test_the_readme_is_short_enough_to_read():
    text = README.read_text()
    assert len(text.encode()) <= 18 * 1024 and "## Contents" in text  # 15 KiB + the shipped results table


def cell_lines():
    return [cell.splitlines() for cell in code_cells()]


def test_the_notebook_stays_short_and_its_recipes_come_first():
    cells = cell_lines()
    assert sum(map(len, cells)) <= 4271 and max(map(len, cells)) <= 120  # a ratchet: lower it as the notebook shrinks
    lines = [line for cell in cells for line in cell]
    first = lambda prefix: next(k + 1 for k, line in enumerate(lines) if line.startswith(prefix))
    assert first("class VAE(") <= 600 and first('@register("conv_vae"') <= 700 and first('@register("dcgan"') <= 900
    parts = [c["source"][0].strip() for c in json.loads(NOTEBOOK.read_text())["cells"]
             if c["cell_type"] == "markdown" and c["source"][0].startswith("# Part")]
    assert parts == ["# Part 1 — Recipes", "# Part 2 — Engine and operations", "# Part 3 — The run"]


def global_names(source):
    """(names a cell defines at top level, module-level names it reads anywhere, function bodies included)"""
    table = symtable.symtable(source, "cell", "exec")
    defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    used, scopes = set(), [table]
    while scopes:
        scope = scopes.pop()
        used |= {s.get_name() for s in scope.get_symbols() if s.is_referenced()
                 and (scope.get_type() == "module" or s.is_global())}
        scopes += scope.get_children()
    return defined, used


def test_no_cell_calls_code_defined_below_it():
    cells = [global_names(source) for source in code_cells()]
    first_definition = {}
    for k, (defined, _) in enumerate(cells):
        for name in defined:
            first_definition.setdefault(name, k)
    late = [f"code cell {k} reads {name}, defined in code cell {first_definition[name]}"
            for k, (_, used) in enumerate(cells) for name in sorted(used) if first_definition.get(name, k) > k]
    assert late == []


def test_notebook_outputs_never_reach_a_commit():
    """nbstripout as the git filter of every notebook, installed by ./reproduce.sh; other output folders ignored."""
    root = NOTEBOOK.parent
    assert "*.ipynb filter=nbstripout" in (root / ".gitattributes").read_text().splitlines()
    assert 'nbstripout" --install' in (root / "reproduce.sh").read_text()
    assert {"/results?*/", "/checkpoints?*/", "/figures?*/"} <= set((root / ".gitignore").read_text().splitlines())
