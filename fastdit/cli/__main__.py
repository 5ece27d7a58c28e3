"""``python -m fastdit.cli ...`` (what ``torchrun -m fastdit.cli train ...`` runs)."""
import sys

from fastdit.cli import main

sys.exit(main())
