"""CI: a deploy folder (`ddi-hw export RUN --deploy`) from an untrained gated ResNet-14 on the smoke
set, for the board-side venv without torch. Usage: python .ci/make_deploy.py OUT_DIR"""
import subprocess
import sys
from pathlib import Path

import torch

from ddi_hw.checkpoint import save_model
from ddi_hw.models import create_model

out = Path(sys.argv[1])
kwargs = {"name": "resnet14", "num_classes": 10, "layer_gates": True, "channel_gates": True,
          "channel_gate_kind": "cnn", "exits": True, "exit_positions": None}
torch.manual_seed(0)
model = create_model(**kwargs).eval()
save_model(out / "run", model, {"config": {"dataset": "smoke"}, "model": kwargs})
subprocess.run(["ddi-hw", "export", str(out / "run"), "--deploy", str(out / "deploy"), "--calib", "32",
                "--eval-limit", "16"], check=True)
