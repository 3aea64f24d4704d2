"""Every Python snippet of the README runs as written, each in a fresh interpreter; where a
snippet names FLUX.1-dev on a GPU, a tiny FLUX pipeline built offline and the CPU stand in."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ditprune.models.tiny import save_tiny_flux_pipeline

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# what a CPU without FLUX.1-dev uses instead: (as written, as run)
STAND_INS = [
    ('SOURCE = "black-forest-labs/FLUX.1-dev"', "SOURCE = {flux!r}"),
    ('DEVICE, DTYPE = "cuda", "bfloat16"', 'DEVICE, DTYPE = "cpu", "float32"'),
    ("steps=28, guidance=3.5, resolution=512", "steps=2, guidance=3.5, resolution=16"),
    ("num_inference_steps=28, guidance_scale=3.5, height=512, width=512",
     "num_inference_steps=2, guidance_scale=3.5, height=16, width=16"),
]
# appended to the FLUX snippet: what it made, for the test to check
CHECK_FLUX = """
import json as _json
_names = ditprune.resolve_targets(pruned.transformer)
_w = [pruned.transformer.get_submodule(n).weight for n in _names]
_pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
print(_json.dumps({"zeros": sum(int((w == 0).sum()) for w in _w) / sum(w.numel() for w in _w),
                   "guidance": pruned.transformer.config.guidance_embeds, "size": list(image.size),
                   "pixel_std": float(_pixels.std())}))
"""


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path):
    code = BLOCKS[index]
    flux_snippet = "black-forest-labs/FLUX.1-dev" in code
    if flux_snippet:
        flux = save_tiny_flux_pipeline(tmp_path / "tiny-flux", guidance=True)  # FLUX.1-dev takes a guidance input
        for written, run in STAND_INS:
            assert written in code, f"README snippet {index} changed: update STAND_INS ({written!r})"
            code = code.replace(written, run.format(flux=str(flux)))
        code += CHECK_FLUX
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README snippet {index} failed:\n{done.stderr[-3000:]}"
    if flux_snippet:
        made = json.loads(done.stdout.strip().splitlines()[-1])
        assert made["guidance"] and made["size"] == [16, 16], made
        assert abs(made["zeros"] - 0.5) < 0.01 and made["pixel_std"] > 1.0, made
