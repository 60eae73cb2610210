"""Start-up hook directory for ``python -m ampcompat run`` (see ``sitecustomize.py``).

``ampcompat.tools.alias.enable_alias_in_child_processes`` puts this directory itself on ``PYTHONPATH``;
this file only makes the directory ship with the package.
"""
