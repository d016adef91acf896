"""Importing slimkit stays light: optional heavy dependencies load only when used."""

import json
import subprocess
import sys

HEAVY = (
    "transformers",
    "onnxruntime",
    "onnx",
    "openvino",
    "nncf",
    "matplotlib",
    "torchao",
    "hqq",
    "optimum",
)

# one interpreter for both checks: starting one costs seconds
PROBE = f"""
import json, sys
heavy = {HEAVY!r}

def loaded():
    return sorted(m for m in sys.modules if m.split('.')[0] in heavy)

import slimkit
after_import = loaded()
import torch
from slimkit import Recipe, compress, load, save
import slimkit.io.artifact, slimkit.prune.magnitude, slimkit.quant.rtn
import slimkit.deploy, slimkit.evaluate.runner
import tempfile
m = torch.nn.Sequential(torch.nn.Linear(2, 2))
compress(m, {{'stages': [{{'quantize': {{}}}}]}})
with tempfile.TemporaryDirectory() as d:
    save(m, d + '/a')
    load(d + '/a', model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
print(json.dumps({{'import': after_import, 'use': loaded(), 'slimkit': 'slimkit' in sys.modules}}))
"""


def test_import_compress_save_load_do_not_load_heavy_dependencies() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["slimkit"] is True
    assert result["import"] == []
    assert result["use"] == []
