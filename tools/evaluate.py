"""Score a megamoe checkpoint on downstream tasks, offline: a JSON result (docs/evaluation.md).

    python tools/evaluate.py runs/tiny-cpu --tasks next_line next_line:mc data/arc_easy.jsonl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamoe.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
