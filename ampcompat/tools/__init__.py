"""The command-line tools behind ``python -m ampcompat``: ``run`` (runner, alias), ``migrate``, ``doctor``."""
