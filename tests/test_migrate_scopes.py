"""``migrate``'s scope-aware name resolution (``tools/migrate/scopes.py``) on small snippets.

Each snippet marks reads with ``# NAME -> LINES``: every read of NAME on that line must see exactly the
definitions made on LINES (``none``: a builtin, or unbound). Definitions are told apart by their line.
Where Python itself can say which binding a read sees (the snippet runs), the snippet is also run with
each definition recording its line, and the recorded line must be among those the analysis gives.
"""
import ast
import sys
import textwrap

import pytest

from ampcompat.tools.migrate.scopes import ScopeMap


def marked_reads(source):
    """{(line, name): expected definition lines} from ``# NAME -> LINES`` comments."""
    expected = {}
    for number, line in enumerate(source.splitlines(), start=1):
        if "# " in line and " -> " in line.split("# ", 1)[1]:
            for mark in line.split("# ", 1)[1].split(";"):
                name, lines = mark.split(" -> ")
                expected[(number, name.strip())] = set() if lines.strip() == "none" else {
                    int(item) for item in lines.split()}
    return expected


def resolved(source, names=None, star_names=lambda module: None):
    """{(line, name): definition lines seen} for every marked read."""
    tree = ast.parse(source)
    scopes = ScopeMap(tree, names=names, star_names=star_names)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)):
            lines = {getattr(d.node, "lineno", d.statement.lineno) for d in scopes.reaching(node)}
            found.setdefault((node.lineno, node.id), set()).update(lines)
    return found


def check(snippet, **kwargs):
    source = textwrap.dedent(snippet)
    expected = marked_reads(source)
    assert expected, "the snippet marks its reads"
    found = resolved(source, **kwargs)
    got = {key: found.get(key, set()) for key in expected}
    assert got == expected


# --- the shapes ----------------------------------------------------------------------------------
def test_a_name_imported_in_one_branch_and_rebound_in_another_is_resolved_per_use_site():
    check("""\
        def wrap(model, fp16, local_rank):
            if fp16:
                from apex.parallel import DistributedDataParallel
                return DistributedDataParallel(model)  # DistributedDataParallel -> 3
            else:
                from torch.nn.parallel import DistributedDataParallel
                return DistributedDataParallel(model, device_ids=[local_rank])  # DistributedDataParallel -> 6
    """)


def test_function_locals_and_parameters_shadow_a_module_import():
    check("""\
        from apex import amp
        def local_torch_amp():
            from torch.cuda import amp
            return amp.GradScaler()  # amp -> 3
        def uses_apex_amp():
            return amp.initialize  # amp -> 1
        def convert(model, apex):
            apex.parallel.convert_syncbn_model(model)  # apex -> 7
        def assigned_later():
            x = amp  # amp -> none
            amp = 1
    """)


def test_both_definitions_reach_after_a_branch_or_a_try():
    check("""\
        try:
            from apex.parallel import DistributedDataParallel as DDP
        except ImportError:
            from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)  # DDP -> 2 4
        if flag:
            from apex import amp
        else:
            amp = None
        amp  # amp -> 7 9
    """)


def test_a_later_rebinding_kills_the_earlier_one():
    check("""\
        from apex import amp
        amp = amp  # amp -> 1
        amp  # amp -> 2
        del amp
        amp  # amp -> none
    """)


# --- Python's scoping rules ------------------------------------------------------------------------------
def test_class_bodies_do_not_enclose_their_methods():
    check("""\
        from apex import amp
        class Trainer:
            amp = "class attribute"
            seen_in_class = amp  # amp -> 3
            def method(self):
                return amp  # amp -> 1
            items = [amp for _ in range(2)]  # amp -> 1
    """)


def test_a_class_body_reads_the_global_until_it_binds_the_name():
    check("""\
        from apex import amp
        class C:
            before = amp  # amp -> 1
            amp = 2
            after = amp  # amp -> 4
    """)


def test_global_and_nonlocal_declarations():
    check("""\
        amp = None
        def setup():
            global amp
            from apex import amp
        def use():
            return amp  # amp -> 1 4
        def outer():
            ddp = None
            def inner():
                nonlocal ddp
                from apex.parallel import DistributedDataParallel as ddp
            inner()
            return ddp  # ddp -> 8 11
        amp  # amp -> 1 4
    """)


def test_closures_see_what_the_enclosing_function_binds_from_their_definition_on():
    # A closure runs after its definition: it sees every binding that can happen from there on. After the
    # `if`, the analysis no longer knows which branch ran, so both lambdas are given both imports (the
    # safe direction: a use may get a binding too many, never one too few).
    check("""\
        def outer(fp16):
            if fp16:
                from apex import amp
                step = lambda: amp.scale_loss  # amp -> 3 6 10
            else:
                from torch import amp
                step = lambda: amp.GradScaler  # amp -> 3 6 10
            def later():
                return amp  # amp -> 3 6 10
            amp = None
            return step, later
        def direct(fp16):
            if fp16:
                from apex import amp
                return [amp for _ in range(1)]  # amp -> 14
            from torch import amp
            return [amp for _ in range(1)]  # amp -> 16
    """)


def test_comprehension_targets_and_walrus():
    check("""\
        amp = 1
        squares = [amp for amp in range(3)]  # amp -> 2
        outside = amp  # amp -> 1 4
        [(amp := value) for value in range(3)]  # (a `:=` in a comprehension binds for the whole scope)
        after = amp  # amp -> 1 4
        gen = (amp for _ in range(2))  # amp -> 1 4
    """)


def test_loops_carry_definitions_around():
    check("""\
        amp = None
        for step in range(3):
            current = amp  # amp -> 1 4
            amp = step
        while cond:
            if other:
                break
            amp = 7
        amp  # amp -> 1 4 8
    """)


def test_returns_and_raises_end_a_path():
    check("""\
        def f(fp16):
            if fp16:
                from apex import amp
                return amp  # amp -> 3
            amp = None
            return amp  # amp -> 5
        def g():
            from apex import amp
            if not ok:
                raise RuntimeError(amp)  # amp -> 8
            amp = 2
            return amp  # amp -> 11
    """)


def test_except_handlers_see_every_state_of_their_try():
    check("""\
        def f():
            amp = None
            try:
                from apex import amp
                amp = amp.initialize  # amp -> 4
            except ImportError:
                print(amp)  # amp -> 2 4 5
            finally:
                print(amp)  # amp -> 2 4 5
    """)


def test_except_as_unbinds_at_the_end_of_the_handler():
    check("""\
        err = 1
        try:
            pass
        except ValueError as err:
            print(err)  # err -> 4
        err  # err -> 1
    """)


def test_match_captures():
    check("""\
        amp = 1
        match command:
            case {"amp": amp}:
                amp  # amp -> 3
            case _:
                pass
        amp  # amp -> 1 3
    """)


def test_imports_of_other_modules_and_star_imports():
    exports = {"apex": ["amp", "parallel"]}
    check("""\
        from apex import *
        amp.initialize  # amp -> 1
        parallel  # parallel -> 1
        from torch import amp
        amp  # amp -> 4
        def f():
            return parallel  # parallel -> 1
    """, star_names=exports.get)


def test_function_parameters_defaults_and_decorators_run_in_the_enclosing_scope():
    check("""\
        from apex.parallel import DistributedDataParallel as DDP
        def wrap(model, wrapper=DDP):  # DDP -> 1
            return wrapper(model)  # wrapper -> 2
        @DDP  # DDP -> 1
        def g(DDP):
            return DDP  # DDP -> 5
        h = lambda DDP=DDP: (  # DDP -> 1
            DDP)  # DDP -> 7
    """)


def test_only_followed_names_are_resolved():
    source = textwrap.dedent("""\
        from apex import amp
        x = 1
        amp, x
    """)
    found = resolved(source, names={"amp"})
    assert found[(3, "amp")] == {1}
    assert found[(3, "x")] == set()


def test_definitions_and_the_reads_they_reach():
    tree = ast.parse(textwrap.dedent("""\
        from apex import amp
        def f():
            return amp
        amp = None
        amp
    """))
    scopes = ScopeMap(tree)
    [imported] = [d for d in scopes.definitions("amp") if d.is_import]
    assert [read.lineno for read in scopes.reads_of(imported)] == [3]  # the function may run before line 4
    [assigned] = [d for d in scopes.definitions("amp") if not d.is_import]
    assert [read.lineno for read in scopes.reads_of(assigned)] == [3, 5]
    assert scopes.definitions_at(imported.node) == [imported]


# --- agreement with Python itself ---------------------------------------------------------------------------
RUNNABLE = {
    "branches": """\
        def wrap(fp16):
            if fp16:
                DDP = record()
                seen(DDP)
            else:
                DDP = record()
                seen(DDP)
            seen(DDP)
        wrap(True); wrap(False)
    """,
    "class body and methods": """\
        amp = record()
        class C:
            seen(amp)
            amp = record()
            seen(amp)
            def m(self):
                seen(amp)
        C().m()
    """,
    "closures called before and after a rebinding": """\
        def outer():
            x = record()
            def inner():
                seen(x)
            inner()
            x = record()
            inner()
            return inner
        outer()()
    """,
    "loops, try and comprehensions": """\
        x = record()
        for i in range(3):
            seen(x)
            if i == 1:
                x = record()
        try:
            x = record()
            raise ValueError
        except ValueError:
            seen(x)
        [seen(x) for x in [record()]]
        seen(x)
    """,
    "globals written by functions": """\
        amp = record()
        def setup():
            global amp
            amp = record()
        def use():
            seen(amp)
        use(); setup(); use()
        seen(amp)
    """,
}


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_every_binding_python_uses_is_among_those_found(name):
    """Run the program: ``seen(NAME)`` records which assignment's value NAME held there (by line); the
    analysis must give that assignment for that read."""
    source = textwrap.dedent(RUNNABLE[name])
    observed = set()
    origin = {}

    def record():
        value = object()
        origin[id(value)] = sys._getframe(1).f_lineno
        return value

    def seen(value):
        observed.add((sys._getframe(1).f_lineno, origin[id(value)]))

    exec(compile(source, "<snippet>", "exec"), {"record": record, "seen": seen})
    tree = ast.parse(source)
    scopes = ScopeMap(tree)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "seen":
            [read] = node.args
            found[node.lineno] = {definition.node.lineno for definition in scopes.reaching(read)}
    assert observed and all(line in found[site] for site, line in observed), (observed, found)


def test_a_function_spelling_a_followed_name_in_nfkc_form_is_still_analysed():
    from ampcompat.tools.migrate.edits import SourceText

    source = "from apex import amp\ndef f():\n    return \uff41\uff4d\uff50\ndef g():\n    return other\n"
    tree = ast.parse(source)
    scopes = ScopeMap(tree, names={"amp"}, text=SourceText(source))
    [read] = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "amp" and isinstance(n.ctx, ast.Load)]
    assert [d.node.lineno for d in scopes.reaching(read)] == [1]  # Python reads ａｍｐ as amp
