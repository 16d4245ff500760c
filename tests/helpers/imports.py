"""What a fresh interpreter imports: the tests that keep light commands light."""

from __future__ import annotations

import subprocess
import sys


def heavy_imports_after(script: str) -> str:
    """Which of torch, timm, DeepSpeed and OpenCV a fresh interpreter holds after running `script`."""
    script += "\nimport sys\nprint(sorted(m for m in ('timm', 'torch', 'deepspeed', 'cv2') if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]  # after whatever the imports logged (DeepSpeed: on stdout)
