"""The notebook as a module, and the command line reproduce.sh uses.

    from nbmodule import load_notebook
    nb = load_notebook()          # the `#| export` cells, cached per process; nothing trains
    nb.frechet_distance(...)

    python tests/nbmodule.py --preflight   # settings, folders, lock, data, checkpoints: one line per problem, exit 2
    python tests/nbmodule.py --run         # execute notebook.ipynb headless with live output (see run_notebook)
    python tests/nbmodule.py --script      # every code cell in order as one script: no Jupyter packages needed
    python tests/nbmodule.py --plan        # the run's plan and its cost measured on this machine; trains nothing
    python tests/nbmodule.py --split FILE DIR [MB] / --join DIR/FILE.parts.json   # weights in parts ≤ MB
    python tests/nbmodule.py --settings-table   # the README's settings table, from the parameters cell

Each export cell is compiled under its own name, `notebook.ipynb:cell 12 (def resolve_settings)`, so a
traceback says which cell broke.
"""
import linecache
import os
import re
import signal
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebook.ipynb"


def _cells(path):
    """The notebook's cells, read as plain JSON: no Jupyter package is needed to import or run the notebook."""
    import json
    return [types.SimpleNamespace(cell_type=c["cell_type"], source="".join(c["source"]),
                                  metadata=c.get("metadata", {})) for c in json.loads(Path(path).read_text())["cells"]]


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


WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")


def without_warnings(text, state):
    """The kernel's stderr without Python warnings (`file:line: SomeWarning: …` and the source line under it):
    the terminal shows the run's own lines; run.log keeps the warnings."""
    out = []
    for line in text.splitlines(True):
        if WARNING_LINE.match(line):
            state["source_line_next"] = True
        elif state.pop("source_line_next", False) and line.startswith("  "):
            pass
        else:
            out.append(line)
    return "".join(out)


def run_script(path=NOTEBOOK, after_cell=None):
    """Every code cell in order in one namespace, as a plain script (a GPU node with torch and the scientific
    stack but no Jupyter can run STAGE=train). A UserError ends in its one line and exit 2. after_cell(namespace)
    runs after each cell (tests put a stand-in Inception network in place with it)."""
    namespace = {"__name__": "__main__"}
    try:
        for index, cell in enumerate(_cells(path)):
            if cell.cell_type == "code":
                name = cell_name(path, index, cell.source)
                linecache.cache[name] = (len(cell.source), None, cell.source.splitlines(True), name)
                exec(compile(cell.source, name, "exec"), namespace)
                if after_cell:
                    after_cell(namespace)
    except Exception as err:
        if type(err).__name__ in ("UserError", "SettingsError"):
            for line in str(err).splitlines():
                print(f"error: {line}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def split_file(path, out_dir, part_mb=16):
    """Cut a file (trained weights) into parts of at most part_mb MiB plus a manifest with every part's SHA-256,
    so it can travel where files are size-limited; join_parts puts it back together."""
    import hashlib
    import json
    path, out_dir, size = Path(path), Path(out_dir), int(part_mb * 2 ** 20)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, parts = path.read_bytes(), []
    for k, start in enumerate(range(0, max(len(data), 1), size)):
        chunk, name = data[start:start + size], f"{path.name}.part{k:03d}"
        (out_dir / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = out_dir / f"{path.name}.parts.json"
    manifest.write_text(json.dumps({"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                    "parts": parts}, indent=1))
    return manifest


class PartsError(ValueError):
    """A parts folder that cannot be joined: damaged, truncated, missing or reordered parts, or a bad manifest."""


def join_parts(manifest, out_dir=None):
    """The file a manifest describes, rebuilt from its parts beside it. A parts folder is untrusted input: every part
    and the whole are checked against their SHA-256 (a missing or altered part is refused, naming it), part names
    are plain names inside the folder, and the result is written to a temporary file of unpredictable name created
    exclusively (never through a link), then renamed over the target (replacing a link there, not following it)."""
    import hashlib
    import json
    import tempfile
    manifest = Path(manifest)
    try:
        spec = json.loads(manifest.read_text())
        parts, name = spec["parts"], Path(str(spec["file"])).name
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PartsError(f"{manifest}: not a readable parts manifest ({type(err).__name__})") from None
    data = b""
    for part in parts:
        part_name = str(part.get("name", "")) if isinstance(part, dict) else ""
        if not part_name or Path(part_name).name != part_name or part_name in (".", ".."):
            raise PartsError(f"{manifest}: part name {part_name!r} is not a plain file name in its folder")
        try:
            chunk = (manifest.parent / part_name).read_bytes()
        except OSError as err:
            raise PartsError(f"{part_name}: cannot be read ({type(err).__name__}); copy it again") from None
        if hashlib.sha256(chunk).hexdigest() != part.get("sha256"):
            raise PartsError(f"{part_name}: contents differ from the manifest; copy it again")
        data += chunk
    if not name or hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise PartsError(f"{manifest}: the joined parts are not the file it describes")
    target = Path(out_dir or manifest.parent) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)  # O_EXCL, random name
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def join_all(parts_dir, checkpoint_dir):
    """Every weight file of a parts folder (what gpu-check sends back) rebuilt into CHECKPOINT_DIR, with the sidecars
    (<model>.json: stamp and history) that STAGE=evaluate reads beside the weights."""
    import shutil
    parts_dir, checkpoint_dir = Path(parts_dir), Path(checkpoint_dir)
    joined = [join_parts(manifest, checkpoint_dir) for manifest in sorted(parts_dir.glob("*.parts.json"))]
    for weights in joined:
        sidecar = parts_dir / weights.with_suffix(".json").name
        if not sidecar.is_file() or sidecar.is_symlink():
            raise PartsError(f"{sidecar}: missing; it travels beside the weight parts (copy it again)")
        shutil.copyfile(sidecar, checkpoint_dir / sidecar.name)
    if not joined:
        raise PartsError(f"{parts_dir}: no *.parts.json manifests: point at the folder gpu-check wrote")
    return joined


def plan_cli(environ=None):
    """./reproduce.sh plan: the run's plan (budgets, seconds measured on this machine, evaluation images, studies)
    printed and written to RESULTS_DIR/plan.md; nothing is trained."""
    nb = load_notebook()
    environ = os.environ if environ is None else environ
    try:
        S = nb.resolve_settings(notebook_parameters(), environ)
        data = nb.load_dataset(S)
        plan = nb.plan_run(S, data, nb.selected_models(S), nb.selected_studies(S))
    except nb.UserError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    text = nb.plan_text(plan, S)
    nb.write_text(Path(S.results_dir) / "plan.md", text)
    print(text, end="")
    return 0


def run_notebook(results_dir, path=NOTEBOOK):
    """Execute the notebook through nbconvert, printing the kernel's output as it comes (and to run.log).

    The executed copy goes to RESULTS_DIR/notebook.executed.ipynb, also after a failure. A failure ends the
    terminal output with one line `error: ...` (exit 2 for a mistake the user can fix, 1 otherwise); the
    traceback is in run.log and in the executed notebook. The kernel exits with this process, even on kill -9.
    """
    import nbformat
    from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    log = RunLog(results / "run.log")
    log.write(f"\n=== run started {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")

    warning_state = {}

    class LiveExecutor(ExecutePreprocessor):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":
                text = msg["content"]["text"]
                shown = text if msg["content"]["name"] != "stderr" else without_warnings(text, warning_state)
                (sys.stderr if msg["content"]["name"] == "stderr" else sys.stdout).write(shown)
                sys.stdout.flush()
                log.write(text)  # run.log keeps everything, third-party warnings included
            return super().output(outs, msg, display_id, cell_index)

        def start_new_kernel(self, **kwargs):
            # the kernel process's own stdout/stderr (C-level warnings; a dying kernel's zmq traceback after
            # Ctrl-C) go to run.log, not the terminal: the terminal gets the cells' output and one error line
            return super().start_new_kernel(stdout=log.stream(), stderr=log.stream(), **kwargs)

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
        refused = [m for m in (save_executed(notebook, results), log.close()) if m]
        for message in dict.fromkeys(refused):  # the disk refused the runner's own files: one line each, exit 2
            print(f"error: {message}", file=sys.stderr)
        code = 2 if refused and code in (0, 2) else code
    return code


def disk_message(err, path):
    return (f"{path} could not be written ({os.strerror(err.errno) if err.errno else type(err).__name__}): free "
            "space there, or point RESULTS_DIR at another disk; everything finished is kept")


class RunLog:
    """results/run.log, appended to, never through a link. A write the disk refuses (full, quota) is remembered,
    not raised: the run goes on, and its end says so in one line."""

    def __init__(self, path):
        self.path, self.refused = path, None
        try:
            self.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644),
                                  "a", buffering=1)
        except OSError as err:
            self.file, self.refused = None, err

    def write(self, text):
        try:
            if self.file is not None:
                self.file.write(text)
        except OSError as err:
            self.refused = err

    def stream(self):
        """Where the kernel process's own output goes: the log file, or nowhere when it cannot be written."""
        import subprocess
        return self.file if self.file is not None and self.refused is None else subprocess.DEVNULL

    def close(self):
        """None, or the one line saying the log could not be written."""
        try:
            if self.file is not None:
                self.file.close()
        except OSError as err:
            self.refused = err
        return disk_message(self.refused, self.path) if self.refused else None


def save_executed(notebook, results):
    """RESULTS_DIR/notebook.executed.ipynb, written to a temporary file and renamed (replacing a link there, never
    writing through it); None, or the one line saying the disk refused it."""
    import nbformat
    executed, tmp = results / "notebook.executed.ipynb", results / f".notebook.executed.{os.getpid()}.tmp"
    try:
        nbformat.write(notebook, str(tmp))
        os.replace(tmp, executed)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return disk_message(err, executed)
    return None


if __name__ == "__main__":
    if sys.argv[1:] in (["--preflight"], ["--check-settings"]):
        sys.exit(preflight())
    if sys.argv[1:2] == ["--split"] and len(sys.argv) in (4, 5):
        sys.exit(print(split_file(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) == 5 else 16)))
    if sys.argv[1:2] in (["--join"], ["--join-all"]) and len(sys.argv) == (3 if sys.argv[1] == "--join" else 4):
        try:
            sys.exit(print(join_parts(sys.argv[2]) if sys.argv[1] == "--join" else join_all(*sys.argv[2:4])))
        except PartsError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    if sys.argv[1:] == ["--script"]:
        sys.exit(run_script())
    if sys.argv[1:] == ["--plan"]:
        sys.exit(plan_cli())
    if sys.argv[1:] == ["--settings-table"]:
        sys.exit(print(settings_table(), end=""))
    if sys.argv[1:2] == ["--run"]:
        nb = load_notebook()
        sys.exit(run_notebook(nb.resolve_settings(notebook_parameters(), os.environ).results_dir))
    sys.exit("usage: python tests/nbmodule.py --preflight | --run")
