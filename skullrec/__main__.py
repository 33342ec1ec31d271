"""``python -m skullrec`` (also what ``torchrun -m skullrec train ...`` runs)."""

from .cli import main

main()
