"""``python -m peftdecl`` (what ``torchrun ... -m peftdecl train FILE`` runs)."""

from peftdecl.cli import main

raise SystemExit(main())
