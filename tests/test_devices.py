"""engine's device helpers: which device a model is on, what a result records, seeded draws."""
import pytest
import torch

from cmerge.engine import device_fields, model_device, seeded_on


def test_seeded_on_the_cpu_draws_from_the_seed_and_restores_the_generator():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_on(torch.device("cpu"), 7):
        inside = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(inside, torch.rand(5, generator=torch.Generator().manual_seed(7)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_on_a_gpu_restores_its_generator_too():
    device = torch.device("cuda")
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    with seeded_on(device, 7):
        inside = torch.rand(5, device=device)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    torch.cuda.manual_seed(7)
    assert torch.equal(inside, torch.rand(5, device=device))


def test_model_device_and_what_a_result_records():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    assert device_fields(torch.device("cpu")) == {}
