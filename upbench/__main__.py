"""``python -m upbench`` is ``upbench``."""
from .cli import main

main()
