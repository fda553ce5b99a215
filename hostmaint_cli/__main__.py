"""``python -m hostmaint_cli``: the ``hostmaint`` program."""

from hostmaint_cli.main import main

main()
