"""``python -m pyfleece`` runs the command-line tool."""

from pyfleece.cli import main

raise SystemExit(main())
