"""A compressed load holds, beside the model it builds, at most 1.25x of the largest tensor:
measured as the peak resident set of a fresh process (Linux ``VmHWM``), not by formula."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditprune.export import save_transformer
from ditprune.membench import flux_shaped

SCRIPT = r"""
import json, sys
import torch
from ditprune import export, membench
export.load_transformer(sys.argv[2])  # a small model of the same class first: every lazy import done
membench._reset_peak_rss()
base = membench._rss("VmRSS")
model = export.load_transformer(sys.argv[1])
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"added": membench._rss("VmHWM") - base, "held": held, "largest": largest,
                  "zeros": float((model.single_transformer_blocks[0].proj_out.weight == 0).float().mean())}))
"""


def _pruned_flux(width, seed=0):
    model = flux_shaped(width, double=1, single=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.masked_fill_(torch.rand(m.weight.shape, generator=g) < 0.5, 0)
    return model


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS counters")
def test_compressed_load_holds_at_most_a_quarter_more_than_its_largest_tensor(tmp_path):
    save_transformer(_pruned_flux(1536), tmp_path / "big", "compressed")  # 1 double + 1 single block: 0.24 GB bf16
    save_transformer(_pruned_flux(256), tmp_path / "small", "compressed")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["zeros"] - 0.5) < 0.01  # the model really came back pruned
    assert r["largest"] == 6 * 1536 * 1536 * 2  # the double block's adaLN Linear (6 x width outputs), bf16
    print(r)
    assert r["added"] <= r["held"] + 1.25 * r["largest"], r
