import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GRAPHOPT_SHARED", ROOT.parent / "shared"))
EFFNET = SHARED / "models" / "efficientnet_lite0.onnx"


@pytest.fixture
def effnet_path():
    if not EFFNET.is_file():
        pytest.skip("../shared/models/efficientnet_lite0.onnx is not present")
    return EFFNET
