"""Which native recipe an Apex opt level becomes under ``--to-native``, and the ``--opt-level`` option.

Plain PyTorch has two mixed-precision recipes: ``torch.autocast`` with FP16 and a
``torch.amp.GradScaler`` (what O1 is), and ``torch.autocast`` with bfloat16, which needs no loss
scaling (what ROCm Apex's O4 is). It has no "FP16 weights with FP32 master weights" training (O2, and
O5 for bfloat16) and no input-casting pure-FP16 model (O3). The documented choice here: O2 and O3
become O1's recipe and O5 becomes O4's, each reported at its call site, because that is PyTorch's
recommended path (FP32 weights, same or better accuracy, usually within a few percent of O2's speed);
the numbers of such a run differ slightly from the original's. O0 (plain FP32) is not rewritten.

A level that is only known at run time (``opt_level=args.opt_level``) is converted only when the user
says which level to assume (``--opt-level O1``), or asks for the choice to stay at run time
(``--opt-level from-args``): then the generated code picks the recipe from the same expression, through a
table of the six levels (``from-args:O2=O4`` sends a level to another recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

LEVELS = ("O0", "O1", "O2", "O3", "O4", "O5")
"""Apex's levels (O4/O5: ROCm Apex's bfloat16 levels)."""

_RECIPE_OF = {"O0": "O0", "O1": "O1", "O2": "O1", "O3": "O1", "O4": "O4", "O5": "O4"}
_DTYPE_OF_RECIPE = {"O0": None, "O1": "torch.float16", "O4": "torch.bfloat16"}

_SUBSTITUTED = {
    "O2": "opt_level O2 becomes O1's native recipe (an FP32 model under torch.autocast with a GradScaler): plain "
          "PyTorch has no FP16 weights with FP32 master weights, so the numbers differ slightly from O2's (see "
          "migration_guide.md, From O2 or O3 to native)",
    "O3": "opt_level O3 becomes O1's native recipe (an FP32 model under torch.autocast with a GradScaler): plain "
          "PyTorch has no input-casting pure-FP16 model; the run is more accurate and its numbers differ from O3's "
          "(see migration_guide.md, From O2 or O3 to native)",
    "O5": "opt_level O5 becomes O4's native recipe (an FP32 model under bfloat16 torch.autocast): plain PyTorch has "
          "no bfloat16 weights with FP32 master weights, so the numbers differ slightly from O5's",
}
O0_BLOCKER = ("opt_level O0 is plain FP32 training: delete amp.initialize, call loss.backward() instead of "
              "amp.scale_loss, and step the optimizer as usual")


class LevelChoiceError(ValueError):
    """An ``--opt-level`` value that is not a level, ``from-args`` or ``from-args:LEVEL=LEVEL,...``."""


@dataclass(frozen=True)
class LevelChoice:
    """What ``--opt-level`` said about levels that are only known at run time.

    Attributes:
        assumed: the level to convert such a call as (``O1``...``O5``), or ``None``.
        from_args: keep the choice at run time (the generated code reads the same expression).
        mapping: for ``from_args``, the native recipe (``O0``, ``O1`` or ``O4``) of each of the six levels.
    """

    assumed: Optional[str] = None
    from_args: bool = False
    mapping: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.from_args:
            return "--opt-level from-args"
        return f"--opt-level {self.assumed}"


def parse_level_choice(text: str) -> LevelChoice:
    """Read an ``--opt-level`` value.

    Args:
        text: ``O1``...``O5``, ``from-args``, or ``from-args:`` followed by ``LEVEL=LEVEL`` pairs
            separated by commas (``from-args:O2=O4,O3=O1``): the recipe each runtime level gets.

    Returns:
        The choice.

    Raises:
        LevelChoiceError: the text is none of those.
    """
    if text in LEVELS[1:]:
        return LevelChoice(assumed=text)
    head, _, tail = text.partition(":")
    if head != "from-args":
        raise LevelChoiceError(f"--opt-level must be O1, O2, O3, O4, O5 or from-args[:LEVEL=LEVEL,...], not {text!r}")
    mapping = dict(_RECIPE_OF)
    for pair in filter(None, tail.split(",")):
        level, _, recipe = pair.partition("=")
        if level not in LEVELS or recipe not in LEVELS:
            raise LevelChoiceError(f"--opt-level {text}: {pair!r} is not LEVEL=LEVEL with levels O0 to O5")
        mapping[level] = _RECIPE_OF[recipe]
    return LevelChoice(from_args=True, mapping=mapping)


@dataclass(frozen=True)
class Recipe:
    """The native code one ``amp.initialize`` call becomes.

    Attributes:
        dtype: the autocast dtype (``torch.float16``/``torch.bfloat16``), or ``None`` when it is chosen at
            run time from ``level_expression``.
        scaled: the GradScaler is enabled (FP16); ``None`` when chosen at run time.
        level_expression: the source of the runtime level (``from-args`` only).
        mapping: for a runtime level, each level's recipe.
        notes: what to say at the call site (the level assumed, a substituted recipe).
    """

    dtype: Optional[str]
    scaled: Optional[bool]
    level_expression: str = ""
    mapping: Dict[str, str] = field(default_factory=dict)
    notes: tuple = ()

    @property
    def at_run_time(self) -> bool:
        return bool(self.level_expression)

    def dtype_table(self) -> str:
        """``{"O0": None, "O1": torch.float16, ...}``: each runtime level's autocast dtype."""
        items = ", ".join(f'"{level}": {_DTYPE_OF_RECIPE[self.mapping[level]]}' for level in LEVELS)
        return "{" + items + "}"


def recipe_for(level: Optional[str], spelled: str, choice: Optional[LevelChoice]) -> "Recipe | str":
    """The recipe for a call whose ``opt_level`` is ``level`` (``None`` when not a literal), or why there is none.

    Args:
        level: the literal level (``"O1"`` when the argument is absent), or ``None`` for one only known at
            run time.
        spelled: the level argument's source text (for a runtime level).
        choice: what ``--opt-level`` said, if given.
    """
    notes = []
    if level is None:
        if choice is None:
            return ("opt_level is only known at run time (it is not a literal); rerun with --opt-level O1 (or the "
                    "level you train with, or from-args to keep choosing it at run time) to convert as if it were "
                    "written here")
        if choice.from_args:
            note = (f"opt_level `{spelled}` is chosen at run time (--opt-level from-args): the native recipe is picked "
                    "from the same value, " + ", ".join(f"{lvl} -> {_describe(choice.mapping[lvl])}" for lvl in LEVELS))
            return Recipe(None, None, spelled, dict(choice.mapping), (note,))
        level = choice.assumed
        notes.append(f"opt_level `{spelled}` is only known at run time: converted as opt_level {level} "
                     f"({choice.describe()})")
    if level not in LEVELS:
        return f"unknown opt_level {level!r}"
    recipe = _RECIPE_OF[level]
    if recipe == "O0":
        return O0_BLOCKER
    if level in _SUBSTITUTED:
        notes.append(_SUBSTITUTED[level])
    dtype = _DTYPE_OF_RECIPE[recipe]
    return Recipe(dtype, dtype == "torch.float16", notes=tuple(notes))


def _describe(recipe: str) -> str:
    return {"O0": "FP32 (autocast and scaler off)", "O1": "FP16 autocast + GradScaler",
            "O4": "bfloat16 autocast"}[recipe]
