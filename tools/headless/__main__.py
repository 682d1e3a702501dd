"""`python -m tools.headless …` (from the pack folder) or `python tools/headless …`."""
import sys

if __package__ in (None, ""):                      # run as a folder: make `tools.headless` importable
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools.headless.cli import main
else:
    from .cli import main

sys.exit(main())
