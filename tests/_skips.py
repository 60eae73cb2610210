"""Skip reasons, each naming what enables the skipped tests."""

NEEDS_CUDA = "needs a CUDA GPU"
NEEDS_INTEGRATIONS_EXTRA = "needs the integrations extra: pip install -e '.[test,integrations]'"
