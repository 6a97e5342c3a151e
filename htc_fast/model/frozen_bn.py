"""BatchNorm with frozen statistics, as HTC's backbone uses it (mmdet `norm_eval=True`).

What it owns: normalising with the stored running statistics in every mode, and keeping
BatchNorm2d's state-dict keys (`weight`, `bias`, `running_mean`, `running_var`,
`num_batches_tracked`) so that mmdetection and torchvision checkpoints load unchanged.
What it does not own: deciding which layers are trainable (see `backbone.ResNet.freeze`).

Why not `nn.BatchNorm2d` + `eval()`: a later `model.train()` would switch it back to batch
statistics and update the running averages; here that cannot happen. Why `weight`/`bias` stay
`nn.Parameter`s (unlike detectron2's FrozenBatchNorm2d, which makes them buffers): mmdetection
trains the affine parameters of stages 2..4 (`norm_cfg.requires_grad=True`), only the statistics
are frozen; the frozen stages turn `requires_grad` off instead.
"""
import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel.

    Args:
        num_features: C.
        eps: added to the variance (1e-5, BatchNorm2d's default, as in mmdet and torchvision).
    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Never incremented; kept only so that the keys match BatchNorm2d's.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The inference batch norm kernel F.batch_norm(training=False) runs on CPU, called as the
        # one aten op it decomposes to (F.batch_norm dispatches an extra empty() for its unused
        # reserve): bit-identical on CPU. On CUDA F.batch_norm would pick cuDNN; under
        # torch.compile both lower to the same arithmetic.
        if x.is_cuda or torch.compiler.is_compiling():
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return torch.ops.aten._native_batch_norm_legit_no_training(
            x, self.weight, self.bias, self.running_mean, self.running_var, 0.0, self.eps)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before PyTorch 0.4.1 (some ImageNet backbones) lack this counter;
        # BatchNorm2d fills it with 0 in that case too.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
