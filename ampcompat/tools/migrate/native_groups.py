"""``apex.parallel.create_syncbn_process_group(group_size)`` under ``--to-native``.

Apex split the world into consecutive groups of ``group_size`` ranks (every rank creating every group, in
order) and returned the one holding this rank, or ``None`` -- the whole world, to ``SyncBatchNorm`` -- for
``group_size == 0``. ``torch.distributed.new_subgroups(group_size)`` creates the same groups in the same order
and returns ``(this rank's group, all groups)``, but refuses 0. So the call becomes
``torch.distributed.new_subgroups(n)[0]`` for a positive literal, ``None`` for 0, and for a size known at run
time ``(torch.distributed.new_subgroups(n)[0] if n != 0 else None)`` (``n`` a name or attribute, read twice).
A size the world cannot be split by still stops the run, with torch's ``ValueError`` instead of Apex's
``AssertionError`` (the note says so).
"""
from __future__ import annotations

import ast
from typing import Optional

from .callargs import NOT_LITERAL, has_starred, literal_value
from .plan import RewritePlan
from .scanner import Use
from .syntax import is_plain_reference

_NOTE = ("create_syncbn_process_group({size}) is now torch.distributed.new_subgroups: the same groups of consecutive "
         "ranks (0: None, the whole world); a size that does not divide the world raises ValueError instead of "
         "AssertionError")


def convert_create_syncbn_process_group(plan: RewritePlan, use: Use) -> Optional[str]:
    """Rewrite the call (see the module docstring); why it cannot be, or ``None``."""
    call = use.node
    if not isinstance(call, ast.Call) or has_starred(call) or len(call.args) + len(call.keywords) != 1 \
            or any(keyword.arg != "group_size" for keyword in call.keywords):
        return "create_syncbn_process_group is not called with group_size alone; rewrite by hand"
    size = call.args[0] if call.args else call.keywords[0].value
    value = literal_value(size)
    spelled = plan.text.segment(size)
    if value is not NOT_LITERAL and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return f"group_size {spelled} is not a whole number of ranks; rewrite by hand"
    if value == 0:
        replacement = "None"
    elif value is not NOT_LITERAL:
        replacement = f"torch.distributed.new_subgroups({spelled})[0]"
    elif is_plain_reference(size):
        replacement = f"(torch.distributed.new_subgroups({spelled})[0] if {spelled} != 0 else None)"
    else:
        return "group_size is an expression, which the rewrite would evaluate twice; assign it to a name first"
    plan.replace(call, replacement)
    plan.note(call, _NOTE.format(size=spelled))
    return None
