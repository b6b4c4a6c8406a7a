"""The public API: every name in diffutron.__all__ means one object, whatever was imported before."""

import subprocess
import sys

import diffutron

CHECK = """
import importlib, sys, types
import diffutron
names = sorted(diffutron.__all__)
if {order!r} == "modules first":  # every submodule imported before any public name is looked up
    for module in set(diffutron._EXPORTS.values()):
        importlib.import_module("diffutron." + module)
for name in names:
    for other in names:  # the others, then this one, twice
        exec(f"from diffutron import {{other}}")
    first = getattr(diffutron, name)
    exec(f"from diffutron import {{name}} as again")
    assert not isinstance(first, types.ModuleType), (name, first)
    assert again is first is getattr(diffutron, name), name
    assert first is getattr(importlib.import_module("diffutron." + diffutron._EXPORTS[name]), name), name
from diffutron import evaluate, fill_mask
import diffutron.evaluate, diffutron.fill_mask
assert callable(diffutron.evaluate) and callable(diffutron.fill_mask) and evaluate is diffutron.evaluate
print("ok", len(names))
"""


def test_every_public_name_is_stable_in_a_fresh_interpreter():
    for order in ("names first", "modules first"):
        done = subprocess.run([sys.executable, "-c", CHECK.format(order=order)], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_the_sampling_api_is_exported():
    assert {"generate", "infill", "SamplingConfig"} <= set(diffutron.__all__)


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; from diffutron.cli import main; "
        "codes = [main(['--help']), main(['--version'])]; "
        "assert codes == [0, 0], codes; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"diffutron {diffutron.__version__}\n" in done.stdout


def test_the_readme_python_snippet_runs(monkeypatch):
    """The README's Python block, run as written (on three short held-out documents, to keep it fast)."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from diffutron.data import read_documents

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Python\n+```python\n(.*?)```", readme, re.S).group(1)
    assert "evaluate(" in snippet and "fill_mask(" in snippet
    short = [SimpleNamespace(text=d.text[:200]) for d in read_documents("bundled:heldout")[:3]]
    monkeypatch.setattr(diffutron, "read_documents", lambda spec: short)
    exec(compile(snippet, "README.md", "exec"), {})
