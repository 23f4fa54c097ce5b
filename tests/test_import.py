"""``import lightning_quant`` stays light: no lightning, transformers, datasets or bitsandbytes."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_heavy_dependency():
    code = (
        "import sys, lightning_quant\n"
        "heavy = ['lightning', 'pytorch_lightning', 'transformers', 'datasets', 'bitsandbytes', 'matplotlib']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"imported at `import lightning_quant`: {result.stdout.strip()}"
