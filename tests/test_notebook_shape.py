"""The notebook as a file people live in: no outputs committed, every setting documented from its one source,
no profile or name dispatch outside the records."""
import json
import re
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
    assert len(text.encode()) <= 15 * 1024 and "## Contents" in text
