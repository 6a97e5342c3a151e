"""htc_fast.diagnostics.count_ops: every kind of sync point is caught once, sync-free code counts
zero, ops are the dispatched ops of forward and backward."""
import pytest
import torch

from htc_fast import _extension
from htc_fast.diagnostics import count_ops


def _x(n=16):
    return torch.randn(n)


# (kind, snippet): each snippet contains exactly one sync point of that kind.
SYNC_SNIPPETS = [
    ("item", lambda x: x.sum().item()),
    ("bool", lambda x: bool((x > 0).any())),
    ("bool", lambda x: 1 if (x > 0).any() else 0),
    ("int", lambda x: int(x.argmax())),
    ("float", lambda x: float(x.max())),
    ("index", lambda x: list(range(10))[x.argmax() % 10]),
    ("tolist", lambda x: x.tolist()),
    ("numpy", lambda x: x.numpy()),
    ("nonzero", lambda x: (x > 0).nonzero()),
    ("nonzero", lambda x: torch.where(x > 0)),
    ("nonzero", lambda x: torch.argwhere(x > 0)),
    ("bool_mask_index", lambda x: x[x > 0]),
    ("bool_mask_index", lambda x: x.view(4, 4)[:, torch.tensor([True, False, True, True])]),
    ("bool_index_put", lambda x: x.clone().__setitem__(x > 0, 0.0)),
    ("bool_index_put", lambda x: x.clone().index_put_((x > 0,), torch.tensor(1.0))),
    ("unique", lambda x: torch.unique((x * 3).round())),
    ("unique", lambda x: torch.unique_consecutive((x * 3).round())),
    ("masked_select", lambda x: x.masked_select(x > 0)),
    ("bincount", lambda x: torch.bincount((x.abs() * 3).long())),
    ("repeat_interleave", lambda x: torch.repeat_interleave((x.abs() * 3).long())),
    ("repeat_interleave", lambda x: x.repeat_interleave((x.abs() * 3).long())),
    ("masked_fill_tensor_value", lambda x: x.masked_fill(x > 0, x.max())),
    ("equal", lambda x: torch.equal(x, x.clone())),
]


@pytest.mark.parametrize("kind,snippet", SYNC_SNIPPETS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SYNC_SNIPPETS)])
def test_each_kind_counts_once(kind, snippet):
    x = _x()
    with count_ops() as c:
        snippet(x)
    assert c.sync_breakdown == {kind: 1}, c.report()
    assert c.syncs == 1
    # The site names this file, not torch or the counter.
    assert c.events[0].where.split(":")[0].endswith("test_op_counter.py"), c.events[0]


SYNC_FREE = [
    lambda x: torch.topk(x, 5).indices,
    lambda x: x.sort(stable=True).values,
    lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    lambda x: x.masked_fill(x > 0, 1.0),
    lambda x: x[torch.tensor([1, 3, 3])],
    lambda x: x.clone().index_put_((torch.tensor([0, 2]),), torch.tensor(5.0)),
    lambda x: x[2:7:2],
    lambda x: x.repeat_interleave(torch.full((16,), 2), output_size=32),
    lambda x: x.repeat_interleave(3),
    lambda x: torch.nn.functional.conv2d(x.view(1, 1, 4, 4), torch.randn(2, 1, 3, 3), padding=1),
    lambda x: torch.randperm(16).argsort(),
    lambda x: torch.scatter_add(torch.zeros(4), 0, torch.arange(16) % 4, x),
    lambda x: (x.abs() > 1).sum(),
    lambda x: x.shape[0] * 2 + len(x),
]


@pytest.mark.parametrize("snippet", SYNC_FREE)
def test_sync_free_code_counts_zero(snippet):
    x = _x()
    with count_ops() as c:
        snippet(x)
    assert c.syncs == 0, c.report()
    assert c.sync_breakdown == {}


def test_ops_count_forward_and_backward():
    x = torch.randn(8, requires_grad=True)
    with count_ops() as fwd:
        y = (x * 2).sin().sum()
    assert fwd.ops == 3
    assert dict(fwd.top_ops()) == {"mul": 1, "sin": 1, "sum": 1}
    with count_ops() as both:
        y = (x * 2).sin().sum()
        y.backward()
    # The backward adds ops (the seed, the sum/sin/mul gradients, the accumulation).
    assert both.ops > fwd.ops + 3
    assert both.syncs == 0
    assert both.top_ops(1)[0][1] >= 2


def test_top_ops_and_report():
    x = _x()
    with count_ops() as c:
        for _ in range(3):
            x = x + 1
        x = x * 2
        x.sum().item()
    assert c.top_ops(2) == [("add", 3), ("mul", 1)]
    assert c.ops == 6  # 3 add, mul, sum, _local_scalar_dense
    text = c.report()
    assert "ops=6 kernel_ops=6 syncs=1" in text and "item" in text and "test_op_counter.py" in text


def test_views_are_ops_but_not_kernel_ops():
    n = int(torch.randint(2, 6, ()))
    x = torch.randn(n, 3)
    with count_ops() as c:
        for _ in range(n):  # view, t, unsqueeze, expand, slice, permute, select, detach
            v = x.view(n, 3).t().unsqueeze(0).expand(2, -1, -1)[:, 1:].permute(0, 2, 1).select(0, 0).detach()
        y = torch.exp(v) + 1  # exp, add: the two kernels
    assert y.shape == (n, 2)
    assert c.ops == 8 * n + 2 and c.kernel_ops == 2 and c.views == 8 * n
    assert dict(c.top_ops())["exp"] == 1


def test_nested_reads_count_once():
    # tolist of a non-CPU tensor copies it to the host: one read, not a read plus a copy.
    x = _x()
    with count_ops() as c:
        x.tolist()
        x.item() if x.numel() == 1 else x[0].item()
    assert c.sync_breakdown == {"tolist": 1, "item": 1}


@pytest.mark.skipif(not _extension.loaded, reason="needs htc_fast._C")
def test_custom_data_dependent_op():
    boxes = torch.rand(20, 4) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    scores, idxs = torch.rand(20), torch.randint(0, 3, (20,))
    with count_ops() as c:
        torch.ops.htc_fast.batched_nms(boxes, scores, idxs, 0.5)
    assert c.sync_breakdown == {"data_dependent_op": 1}
    assert c.top_ops() == [("htc_fast::batched_nms", 1)]


def test_extra_data_dependent_ops():
    x = _x()
    with count_ops(data_dependent_ops=["aten::sort"]) as c:
        x.sort()
        x.sin()
    assert c.sync_breakdown == {"data_dependent_op": 1}


@pytest.mark.cuda
def test_cuda_sync_inside_an_op():
    # histc with min == max reads the data's range on the host inside the CUDA kernel's launcher.
    x = torch.randn(100, device="cuda")
    with count_ops() as c:
        torch.histc(x, bins=10)
    assert c.sync_breakdown == {"cuda:aten::histc": 1}, c.report()
    with count_ops() as c:
        x.cpu()
    assert c.sync_breakdown == {"device_to_host": 1}, c.report()
    assert torch.cuda.get_sync_debug_mode() == 0
