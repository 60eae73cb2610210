"""Small models and data shared by the tests."""
import torch
import torch.nn.functional as F


class MLP(torch.nn.Module):
    """Linear + BatchNorm + LayerNorm: exercises FP16-list, FP32-list and batchnorm behaviour."""

    def __init__(self, d_in: int = 8, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.bn = torch.nn.BatchNorm1d(d_hidden)
        self.ln = torch.nn.LayerNorm(d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.ln(F.relu(self.bn(self.fc1(x)))))


def layer_norm_in_fp32(model):
    """Make ``model.ln`` run as under O1 on every device: FP32 input, autocast off (Apex's FP32 list).

    For hand-written native-autocast references: CUDA autocast runs layer_norm like this, CPU autocast
    does not (it stays FP16 there), and ampcompat's O1 follows Apex on every device.
    """
    ln = model.ln

    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    ln.forward = forward
    return model


def make_mlp(device="cpu", seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw).to(device)


def batches(n, device="cpu", seed=1, batch=16, d_in=8, d_out=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d_in, generator=g).to(device)
        y = torch.randint(0, d_out, (batch,), generator=g).to(device)
        out.append((x, y))
    return out


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]
