import pytest
import torch

import ditprune

from conftest import TwoLinear, linear_batches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "dit", "sparsegpt"])
def test_half_precision_statistics_in_fp32_and_masks_match_fp32(dtype, method):
    ref = TwoLinear()
    with torch.no_grad():  # weights and inputs representable in both dtypes
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    batches32 = [{"x": b["x"].to(dtype).float()} for b in linear_batches()]
    half = TwoLinear().to(dtype)
    half.load_state_dict(ref.state_dict())
    ditprune.prune(ref, batches32, method=method, sparsity=0.5, targets=["fc1"])
    ditprune.prune(half, [{"x": b["x"].to(dtype)} for b in batches32], method=method, sparsity=0.5, targets=["fc1"])
    assert half.fc1.weight.dtype == dtype
    assert torch.equal(half.fc1.weight != 0, ref.fc1.weight != 0)


def test_stats_accumulate_in_fp32_with_a_count():
    from ditprune.stats import InputStats

    s = InputStats("x", 4, need_gram=True)
    x = torch.full((1000, 4), 1e-3, dtype=torch.bfloat16)
    for _ in range(10):
        s.update(x)
    assert s.sq_sum.dtype == torch.float32 and s.count == 10_000
    torch.testing.assert_close(s.energy, torch.full((4,), float(x[0, 0].float()) ** 2))
    torch.testing.assert_close(s.gram, torch.full((4, 4), float(x[0, 0].float()) ** 2))
