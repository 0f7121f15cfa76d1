"""``python -m fgo_actors._cli``: the same as the ``fgo`` command."""

from .main import main

main()
