"""The notebook as a module, and the command line reproduce.sh uses.

    from nbmodule import load_notebook
    nb = load_notebook()          # the `#| export` cells, cached per process; nothing trains
    nb.frechet_distance(...)

    python tests/nbmodule.py --preflight   # settings, folders, lock, data, checkpoints: one line per problem, exit 2
    python tests/nbmodule.py --run         # execute notebook.ipynb headless with live output (see run_notebook)
    python tests/nbmodule.py --settings-table   # the README's settings table, from the parameters cell

Each export cell is compiled under its own name, `notebook.ipynb:cell 12 (def resolve_settings)`, so a
traceback says which cell broke.
"""
import linecache
import os
import signal
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebook.ipynb"


def _cells(path):
    return nbformat.read(str(path), as_version=4).cells


def cell_name(path, index, source):
    first = next((line.strip() for line in source.splitlines()[1:] if line.strip()), "")
    return f"{Path(path).name}:cell {index} ({first[:60]})"


@lru_cache(maxsize=None)
def load_notebook(path=NOTEBOOK):
    module = types.ModuleType("notebook_exports")
    module.__file__ = str(path)
    sys.modules["notebook_exports"] = module  # dataclasses look their module up here
    for index, cell in enumerate(_cells(path)):
        if cell.cell_type == "code" and cell.source.lstrip().startswith("#| export"):
            name = cell_name(path, index, cell.source)
            linecache.cache[name] = (len(cell.source), None, cell.source.splitlines(True), name)  # for tracebacks
            exec(compile(cell.source, name, "exec"), module.__dict__)
    return module


def notebook_parameters(path=NOTEBOOK):
    """The defaults in the cell tagged `parameters` (papermill's convention), as a dict."""
    for cell in _cells(path):
        if "parameters" in cell.metadata.get("tags", []):
            values = {}
            exec(cell.source, {}, values)
            return values
    raise LookupError(f"{path}: no cell tagged 'parameters'")


def settings_table(path=NOTEBOOK):
    """The README's settings table, generated from the `parameters` cell: name, default, the line's comment."""
    import ast
    cell = next(c for c in _cells(path) if "parameters" in c.metadata.get("tags", []))
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for line in cell.source.splitlines():
        code, _, comment = line.partition("#")
        if "=" in code:
            name, value = (part.strip() for part in code.split("=", 1))
            default = ast.literal_eval(value)
            lines.append(f"| `{name}` | `{default!r}` | {comment.strip().replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def preflight(environ=None):
    """Resolve the settings and run every check that needs no kernel; print problems, return the exit code."""
    nb = load_notebook()
    environ = os.environ if environ is None else environ
    try:
        settings = nb.resolve_settings(notebook_parameters(), environ)
        for line in nb.misspelt_settings(environ, list(nb.RULES)) + nb.small_count_warnings(settings):
            print(f"warning: {line}", file=sys.stderr)
        nb.preflight(settings)
    except nb.UserError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def run_notebook(results_dir, path=NOTEBOOK):
    """Execute the notebook through nbconvert, printing the kernel's output as it comes (and to run.log).

    The executed copy goes to RESULTS_DIR/notebook.executed.ipynb, also after a failure. A failure ends the
    terminal output with one line `error: ...` (exit 2 for a mistake the user can fix, 1 otherwise); the
    traceback is in run.log and in the executed notebook. The kernel exits with this process, even on kill -9.
    """
    from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    log = open(results / "run.log", "a", buffering=1)
    log.write(f"\n=== run started {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")

    class LiveExecutor(ExecutePreprocessor):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":
                text = msg["content"]["text"]
                (sys.stderr if msg["content"]["name"] == "stderr" else sys.stdout).write(text)
                sys.stdout.flush()
                log.write(text)
            return super().output(outs, msg, display_id, cell_index)

        def start_new_kernel(self, **kwargs):
            # the kernel process's own stdout/stderr (C-level warnings; a dying kernel's zmq traceback after
            # Ctrl-C) go to run.log, not the terminal: the terminal gets the cells' output and one error line
            return super().start_new_kernel(stdout=log, stderr=log, **kwargs)

    def stop(signum, frame):
        raise KeyboardInterrupt  # unwinds through nbclient, which shuts the kernel down

    signal.signal(signal.SIGTERM, stop)
    os.environ["LAB_EXIT_WITH_PARENT"] = str(os.getpid())  # the kernel's watchdog: exit when this process dies
    notebook = nbformat.read(str(path), as_version=4)
    executor = LiveExecutor(timeout=None, kernel_name="python3")
    code = 0
    try:
        executor.preprocess(notebook, {"metadata": {"path": str(Path.cwd())}})
    except CellExecutionError as err:
        user_error = err.ename in ("UserError", "SettingsError")
        log.write(str(err) + "\n")
        lines = [line for line in str(err.evalue).splitlines() if line.strip()] or [err.ename]
        for line in lines if user_error else [f"{err.ename}: {lines[-1]}"]:
            print(f"error: {line}", file=sys.stderr)
        if not user_error:
            print(f"error: the traceback is in {results / 'run.log'} and {results / 'notebook.executed.ipynb'}",
                  file=sys.stderr)
        code = 2 if user_error else 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    finally:
        nbformat.write(notebook, str(results / "notebook.executed.ipynb"))
        log.close()
    return code


if __name__ == "__main__":
    if sys.argv[1:] in (["--preflight"], ["--check-settings"]):
        sys.exit(preflight())
    if sys.argv[1:] == ["--settings-table"]:
        sys.exit(print(settings_table(), end=""))
    if sys.argv[1:2] == ["--run"]:
        nb = load_notebook()
        sys.exit(run_notebook(nb.resolve_settings(notebook_parameters(), os.environ).results_dir))
    sys.exit("usage: python tests/nbmodule.py --preflight | --run")
