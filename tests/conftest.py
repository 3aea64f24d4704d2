import json
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*Enum subclass.*")


class TwoLinear(nn.Module):
    """x -> fc1 -> gelu -> fc2; inputs come in as model(x=...)."""

    def __init__(self, d_in=16, d_hidden=32, d_out=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def linear_batches(d_in=16, n=4, tokens=32, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else torch.logspace(-1, 1, d_in)  # channels of very different energy
    return [{"x": torch.randn(2, tokens, d_in, generator=g) * scale} for _ in range(n)]


@pytest.fixture
def two_linear():
    return TwoLinear()


def save_tiny_dit_pipeline(path):
    """A tiny DiTPipeline (random weights) saved as a hub pipeline directory would be."""
    import diffusers

    from ditprune.models.tiny import tiny_model

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=4, sample_size=8)
    id2label = {str(i): name for i, name in enumerate(["golden retriever", "tabby", "goldfish", "volcano",
                                                         "espresso", "castle", "pizza", "daisy", "tench", "robin"])}
    diffusers.DiTPipeline(transformer=tiny_model("dit"), vae=vae, scheduler=diffusers.DDIMScheduler(),
                          id2label=id2label).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())  # as on the hub: labels live in model_index.json
    (path / "model_index.json").write_text(json.dumps({**index, "id2label": id2label}))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return save_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny_dit_pipeline"))


def tree_bytes(path):
    """{relative path: bytes} of every file under ``path``: to show nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
