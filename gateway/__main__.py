"""``python -m gateway`` = ``openhqm-gateway``."""

from gateway.cli import main

raise SystemExit(main())
