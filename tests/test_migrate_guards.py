"""Checks for Apex by name (``tools/migrate/guards.py``): only real lookups count, and each keeps its answer.

Only ``sys.modules`` lookups, ``find_spec``, ``importlib.metadata``/``pkg_resources`` lookups and
``is_apex_available``-style helpers are checks; ``"apex" in sys.argv`` is data. Under ``--to-native``, a
check in a file left with no Apex or ampcompat is replaced by the answer it gave under ampcompat where
only its truth value is used -- and that answer is checked by evaluating the original expression under
the import alias.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ampcompat.tools.migrate import guards
from ampcompat.tools.migrate.scanner import scan
from ampcompat.tools.migrate.sources import load_source
from ampcompat.tools.migrate.to_native import to_native

REPO = Path(__file__).resolve().parents[1]


def checks_in(source):
    tree = ast.parse(textwrap.dedent(source))
    nodes = list(ast.walk(tree))
    origins = guards.import_origins(nodes)
    return [(check.node.lineno, check.kind) for check in guards.iter_checks(nodes, origins, lambda m: m == "apex")]


def test_what_counts_as_a_check():
    assert checks_in("""\
        import sys, importlib, importlib.util, pkgutil
        import importlib.metadata as im
        from importlib.metadata import version
        import pkg_resources
        from transformers.utils import is_apex_available
        from lightning_utilities.core.imports import RequirementCache
        a = "apex" in sys.modules
        b = "apex" not in sys.modules.keys()
        c = sys.modules["apex"]
        d = sys.modules.get("apex")
        e = importlib.util.find_spec("apex")
        f = pkgutil.find_loader("apex")
        g = im.version("apex")
        h = version("apex")
        i = pkg_resources.get_distribution("apex")
        j = "apex" in {d.key for d in pkg_resources.working_set}
        k = is_apex_available()
        l = RequirementCache("apex")
        m = importlib.import_module("apex")
    """) == [(7, "sys.modules"), (8, "sys.modules"), (9, "sys.modules"), (10, "sys.modules"), (11, "find_spec"),
             (12, "find_spec"), (13, "metadata"), (14, "metadata"), (15, "metadata"), (16, "metadata"),
             (17, "helper"), (18, "helper"), (19, "import")]


def test_what_does_not_count():
    assert checks_in("""\
        import sys
        if "apex" in sys.argv:
            pass
        use = args.amp == "apex"
        backends = {"apex", "native"}
        x = "apex" in backends
        y = "apex" in os.environ.get("AMP", "")
        def version(name):
            return name
        z = version("apex")
        w = parse_version("apex")
        v = "amp" in sys.modules
    """) == []


def test_a_setup_py_flag_is_not_reported_and_not_rewritten(tmp_path, capsys):
    from ampcompat.tools import migrate

    setup = tmp_path / "setup.py"
    setup.write_text('import sys\nif "apex" in sys.argv:\n    sys.argv.remove("apex")\n')
    for mode in ([], ["--write"], ["--to-native"], ["--check"]):
        assert migrate.main([str(setup), *mode]) == 0
    out = capsys.readouterr().out
    assert "0 Apex uses" in out.splitlines()[-1]
    assert setup.read_text() == 'import sys\nif "apex" in sys.argv:\n    sys.argv.remove("apex")\n'


# --- the answers --------------------------------------------------------------------------------------------
EXPRESSIONS = [
    '"apex" in sys.modules',
    '"apex" not in sys.modules',
    'importlib.util.find_spec("apex") is not None',
    'importlib.util.find_spec("apex") is None',
    'not importlib.util.find_spec("apex")',
    'bool(importlib.util.find_spec("apex"))',
    'sys.modules.get("apex") is not None',
    'importlib.metadata.version("apex") is not None',
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_a_replaced_check_keeps_the_answer_it_gave_under_ampcompat(tmp_path, expression):
    """The literal --to-native writes is what the expression evaluates to under the import alias."""
    source = f"import importlib.metadata, importlib.util, sys\nimport apex\nANSWER = {expression}\n"
    code = f"import ampcompat; ampcompat.install_apex_alias()\n{source}\nprint(ANSWER)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    under_ampcompat = proc.stdout.strip() == "True"
    path = tmp_path / "check.py"
    path.write_text(f"import importlib.metadata, importlib.util, sys\nANSWER = {expression}\n")
    result = to_native(scan(load_source(str(path))))
    namespace = {}
    exec(result.text, namespace)
    assert namespace["ANSWER"] is under_ampcompat, result.text
    assert "TODO(ampcompat): this was" in result.text


def test_a_check_used_as_a_value_is_reported_as_now_answering_false(tmp_path):
    path = tmp_path / "value.py"
    path.write_text('import importlib.metadata\nAPEX_VERSION = importlib.metadata.version("apex")\n')
    result = to_native(scan(load_source(str(path))))
    assert 'APEX_VERSION = importlib.metadata.version("apex")' in result.text  # not rewritten
    [note] = [n for n in result.notes if "now answers False" in n.message]
    assert note.line == 2


def test_or_and_pass_values_on_so_only_a_condition_is_replaced(tmp_path):
    path = tmp_path / "boolop.py"
    path.write_text(textwrap.dedent("""\
        import importlib.util
        spec = importlib.util.find_spec("apex") or fallback
        if ready and importlib.util.find_spec("apex"):
            pass
    """))
    text = to_native(scan(load_source(str(path)))).text
    assert 'spec = importlib.util.find_spec("apex") or fallback' in text
    assert "if ready and True:" in text
