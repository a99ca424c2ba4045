import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# prune-channels' default round_to is this CPU's channel block (16 with AVX-512): the tests' small
# nets (8-16 channels) are pruned with round_to 1 unless a test asks for a block
os.environ.setdefault("GRAPHOPT_CHANNEL_BLOCK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GRAPHOPT_SHARED", ROOT.parent / "shared"))
EFFNET = SHARED / "models" / "efficientnet_lite0.onnx"


@pytest.fixture
def effnet_path():
    if not EFFNET.is_file():
        pytest.skip("../shared/models/efficientnet_lite0.onnx is not present")
    return EFFNET
