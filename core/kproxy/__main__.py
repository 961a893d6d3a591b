"""``python -m kproxy`` is the ``kproxy`` command."""

from .cli import main

main()
