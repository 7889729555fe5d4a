"""The stand-in accelerator itself: it fails where CUDA fails, passes where CUDA passes, and
computes what the CPU computes."""

from __future__ import annotations

import pytest
import torch

from .stand_in import DEVICE, DeviceMismatch, StandIn, stand_in_device


def test_a_cpu_operand_fails_like_on_cuda():
    with stand_in_device() as dev:
        x = torch.arange(6.0).reshape(2, 3).to(dev)
        with pytest.raises(DeviceMismatch, match="cpu"):
            x + torch.ones(3)
        with pytest.raises(DeviceMismatch):
            torch.cat([x, torch.zeros(1, 3)])
        with pytest.raises(DeviceMismatch):
            x.index_select(0, torch.tensor([1]))  # CUDA needs index_select's index on the device
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()


def test_what_cuda_allows_passes_with_the_values_of_the_cpu():
    x_cpu = torch.arange(12.0).reshape(3, 4)
    with stand_in_device() as dev:
        x = x_cpu.to(dev)
        assert isinstance(x, StandIn) and x.device == DEVICE
        y = x * torch.tensor(2.0)  # a CPU scalar
        assert isinstance(y, StandIn) and torch.equal(y.cpu(), x_cpu * 2)
        assert torch.equal(x[torch.tensor([2, 0])].cpu(), x_cpu[[2, 0]])  # CPU indices
        assert torch.equal(x[x > 5].cpu(), x_cpu[x_cpu > 5])
        made = torch.tensor([[1, 2], [3, 4]], device=x.device)  # data, not a data-less meta tensor
        assert isinstance(made, StandIn) and made.tolist() == [[1, 2], [3, 4]]
        z = torch.zeros(2, device=dev)
        z.add_(1)
        assert isinstance(z, StandIn) and z.sum().item() == 2.0
        host = torch.empty(3, 4)
        host.copy_(x)  # cross-device copy
        assert type(host) is torch.Tensor and torch.equal(host, x_cpu)


def test_autograd_and_an_optimizer_step_stay_on_the_device():
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 2)
    inputs = torch.randn(5, 4)
    with stand_in_device() as dev:
        net = torch.nn.Linear(4, 2)
        net.load_state_dict(ref.state_dict())
        net.to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net(inputs.to(dev)).square().sum().backward()
        opt.step()
        assert all(isinstance(p, StandIn) and isinstance(p.grad, StandIn) for p in net.parameters())
        moved = net.weight.cpu()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref(inputs).square().sum().backward()
    opt_ref.step()
    assert torch.equal(moved, ref.weight.detach())
