from __future__ import annotations

from podbay.cli import main

raise SystemExit(main())
