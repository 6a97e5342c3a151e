"""The C++/CUDA backward kernels under torch.use_deterministic_algorithms(True): the CUDA RoIAlign
and DCN backwards accumulate with atomics and raise (as torchvision's); the CPU backwards are
deterministic and run."""
import pytest
import torch

import htc_fast.ops  # noqa: F401  (loads htc_fast._C, which registers the operators)
from tests.support import require_backend

C = torch.ops.htc_fast


def backward_calls(device):
    """(name, call) for every backward operator with an atomic CUDA kernel."""
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]], device=device)
    grad = torch.rand(1, 2, 2, 2, device=device)
    x, grad_out = torch.rand(1, 2, 4, 4, device=device), torch.rand(1, 2, 4, 4, device=device)
    weight, offset = torch.rand(2, 2, 1, 1, device=device), torch.rand(1, 2, 4, 4, device=device) - 0.5
    return [
        ("roi_align_backward", lambda: C.roi_align_backward(grad, rois, 1.0, 2, 2, 1, 2, 8, 8, 2, True)),
        ("multilevel_roi_align_backward",
         lambda: C.multilevel_roi_align_backward(grad, rois, [1.0], 2, 2, [8], [8], 1, 2, 2, True, 56.0)),
        ("deform_conv2d_backward",
         lambda: C.deform_conv2d_backward(grad_out, x, weight, offset, None, 1, 1, 0, 0, 1, 1, 1, 1)),
    ]


@pytest.mark.cuda
def test_cuda_atomic_backwards_raise(deterministic):
    require_backend("cpp", "cuda")
    for name, call in backward_calls(torch.device("cuda")):
        with pytest.raises(RuntimeError, match=name):
            call()


def test_cpu_backwards_are_deterministic_and_run(deterministic):
    require_backend("cpp", "cpu")
    for _, call in backward_calls(torch.device("cpu")):
        first, second = call(), call()
        first = first if isinstance(first, (tuple, list)) else [first]
        second = second if isinstance(second, (tuple, list)) else [second]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
