"""The notebook in a real Jupyter kernel, as a user runs it (Restart and Run All, then Run All again in the same
kernel): no empty stderr strips, notices for environment overrides, a second Run All that plans no work and
retrains nothing, no lock held by the idle kernel afterwards; and one line for an interrupt or a mistake."""
import copy
import os
import sys
import types

import nbformat
import pytest
from nbclient import NotebookClient

from nbmodule import NOTEBOOK

SMALL = {"PROFILE": "smoke", "DEVICE": "cpu", "MODELS": "conv_vae,dcgan", "N_TRAIN": "128", "FID_SAMPLES": "16",
         "EXPERIMENTS": "none", "PATIENCE": "0"}


def stream_texts(notebook, name):
    return [out["text"] for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == "stream" and out.get("name") == name]


def test_run_all_twice_in_one_kernel(tmp_path, monkeypatch):
    env = {**SMALL, "RESULTS_DIR": str(tmp_path / "results"), "CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "FIGURES_DIR": str(tmp_path / "figures"), "CACHE_DIR": str(tmp_path / "cache")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LAB_EXIT_WITH_PARENT", raising=False)
    notebook = nbformat.read(str(NOTEBOOK), as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    def run_all():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                cell.outputs = []
                client.execute_cell(cell, index)
    with client.setup_kernel():
        run_all()  # Restart and Run All
        first = nbformat.from_dict(copy.deepcopy(notebook))
        run_all()  # Run All again, same kernel: it reuses every model and evaluation
    stderr = stream_texts(first, "stderr")
    assert not [t for t in stderr if not t.replace("\r", "").strip()], "an empty stderr output"
    stdout = "".join(stream_texts(first, "stdout"))
    assert "note: PROFILE='smoke' from the environment overrides PROFILE = 'auto' of the parameters cell" in stdout
    plan = "".join(stream_texts(notebook, "stdout"))
    assert "plan: conv_vae (reused: training, evaluation)" in plan and "plan: dcgan (reused: training, evaluation)" in plan
    assert "Estimated total: 0.0 min" in plan and "not retraining" in plan and "evaluation reused" in plan
    sys.path.insert(0, str(NOTEBOOK.parent / "tests"))
    import nbmodule
    nb = nbmodule.load_notebook()
    S = nb.resolve_settings(nbmodule.notebook_parameters(), {**os.environ, **env}, cuda_available=False)
    nb.hold_run_locks(S, wait_seconds=0)   # the idle kernel holds no folder
    nb.release_run_locks()


def test_an_interrupt_or_a_mistake_in_jupyter_is_one_line_and_frees_the_folders(nb, settings, monkeypatch, capsys):
    import builtins
    shell = types.SimpleNamespace(handler=None)
    shell.set_custom_exc = lambda kinds, handler: setattr(shell, "handler", handler)
    monkeypatch.setattr(builtins, "get_ipython", lambda: shell, raising=False)
    monkeypatch.delenv("LAB_EXIT_WITH_PARENT", raising=False)
    nb.one_line_errors_in_jupyter()
    S = settings()
    nb.hold_run_locks(S)
    shell.handler(shell, KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "interrupted: every finished epoch, model and evaluation is kept; Run All resumes\n"
    assert nb._LOCKS == {}
    shell.handler(shell, nb.UserError, nb.UserError("BATCH_SIZE=1: raise it"), None)
    assert capsys.readouterr().err == "error: BATCH_SIZE=1: raise it\n"


def test_a_second_run_names_the_kernel_that_holds_the_folders(nb, settings, monkeypatch):
    import builtins
    ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    monkeypatch.setattr(builtins, "get_ipython", ZMQInteractiveShell, raising=False)
    monkeypatch.delenv("LAB_EXIT_WITH_PARENT", raising=False)
    assert nb.run_holder() == "a Jupyter kernel running the notebook"
    with pytest.raises(nb.UserError, match=r"in use by pid \d+, a Jupyter kernel running the notebook"):
        import subprocess
        S = settings()
        code = (f"import builtins, sys; builtins.get_ipython = type('ZMQInteractiveShell', (), {{}}); "
                f"sys.path.insert(0, {str(NOTEBOOK.parent / 'tests')!r}); from nbmodule import load_notebook, "
                f"notebook_parameters; nb = load_notebook(); import os; "
                f"S = nb.resolve_settings(notebook_parameters(), os.environ, cuda_available=False); nb.hold_run_locks(S); "
                "print('locked', flush=True); sys.stdin.read()")
        env = {**os.environ, "PROFILE": "smoke", "DEVICE": "cpu", "RESULTS_DIR": S.results_dir,
               "CHECKPOINT_DIR": S.checkpoint_dir, "FIGURES_DIR": S.figures_dir}
        env.pop("LAB_EXIT_WITH_PARENT", None)
        holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            nb.hold_run_locks(S, wait_seconds=0)
        finally:
            holder.stdin.close()
            holder.wait()
