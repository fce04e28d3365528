"""onnxruntime never records or uploads telemetry from our processes, whichever component loads it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Loads the runtime through the component's module and runs a model, as the component does.
SCORE_A_ROW = """
import importlib, sys
import numpy as np
module = importlib.import_module(sys.argv[1])
from tests.scorer.helpers import logistic_onnx
ort = module.onnxruntime if hasattr(module, "onnxruntime") else module.ort
session = ort.InferenceSession(logistic_onnx(), providers=["CPUExecutionProvider"])
width = session.get_inputs()[0].shape[1]
print(session.run(None, {session.get_inputs()[0].name: np.zeros((1, width), np.float32)})[-1])
"""


@pytest.mark.parametrize("module", ["scorer.model", "batch.export", "batch.registry"])
def test_no_component_lets_onnxruntime_phone_home(tmp_path, module):
    # onnxruntime 1.32 for Linux keeps a device id and a queue of events for Microsoft under
    # ~/.cache/Microsoft unless ORT_DISABLE_TELEMETRY is set before it loads (CI variables also
    # silence it, so they are taken out here).
    quiet = {"ORT_DISABLE_TELEMETRY", "GITHUB_ACTIONS", "TF_BUILD"}
    env = {k: v for k, v in os.environ.items() if k not in quiet} | {"HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", SCORE_A_ROW, module], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "telemetry" not in result.stderr
    assert list(tmp_path.rglob("*")) == []                  # no device id, no event queue
