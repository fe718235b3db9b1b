"""Small models and plans several test modules share."""

import torch
import torch.nn.functional as F
from torch import nn

import autoq
from autoq.dispatch.layers import layer_shapes
from autoq.dispatch.rule import Measurement, fit_rule
from autoq.dispatch.table import CpuIdentity, DispatchTable
from autoq.plan import QuantPlan
from autoq.recipes.qat import Training


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


class Block(nn.Module):
    """conv->ReLU6 three ways (module, F.relu6, Hardtanh(0, 6)) and one conv whose output is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 8, 1)
        self.clamp = nn.Hardtanh(0.0, 6.0)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.act(self.a(x))
        x = F.relu6(self.b(x))
        x = self.clamp(self.c(x))
        y = self.d(x)
        return F.relu6(y) + y  # d's output has two users: it must not be folded


class Net(nn.Module):
    """Conv-BN-ReLU6, a depthwise conv, a residual add and a linear head, times `gain` if given: a
    non-persistent buffer, so it comes from the code, not from a saved model."""

    def __init__(self, gain: float | None = None) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)
        self.register_buffer("gain", None if gain is None else torch.tensor(gain), persistent=False)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = y + self.depthwise(y)
        y = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
        return y if self.gain is None else y * self.gain


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def fresh(cls=Net, seed=1, **kwargs):
    """An untrained FP32 model of the same class with other weights: only its structure can be reused."""
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def tuned_model(recipe="static", cls=Net, dispatch=None, gain=None, **plan):
    model = fresh(cls, seed=0) if gain is None else fresh(cls, seed=0, gain=gain)
    x = torch.randn(4, 5, 6) if cls is Recurrent else torch.randn(4, 3, 16, 16)
    calib = [torch.randn_like(x) for _ in range(3)]
    training = None
    if recipe in ("qat", "pt2e-qat"):
        training = Training(train_data=[(c, torch.randn(4, 4)) for c in calib], loss_fn=nn.functional.mse_loss)
        plan.setdefault("qat_epochs", 1)
    return autoq.quantize(model, QuantPlan(recipe=recipe, **plan), x, calib, training=training, dispatch=dispatch), x


def saturation_net() -> nn.Module:
    """A depthwise 3x3 conv of ones on inputs at the top of the 8-bit range, then a pointwise conv.

    FBGEMM's depthwise kernel adds u8*s8 products pairwise in saturating int16 on every CPU (~56% of
    the true sum here); oneDNN's is exact with or without VNNI (autoq.dispatch.isa probes both). So
    the depthwise layer's output says which library ran it.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model.eval()


X = torch.ones(1, 8, 6, 6)


FBGEMM_PLAN = QuantPlan(engine="fbgemm", reduce_range=False, activation_observer="minmax")


def two_entry_table(cpu: CpuIdentity, depthwise_library: str) -> DispatchTable:
    """Exact entries for saturation_net's layers; a rule that says FBGEMM for everything."""
    shapes = layer_shapes(autoq.quantize(saturation_net(), FBGEMM_PLAN, X, [X]), (X,))
    slow = {"fbgemm": 10.0, "onednn": 20.0}
    fast = {"fbgemm": 20.0, "onednn": 10.0} if depthwise_library == "onednn" else slow
    table = DispatchTable(cpu, torch.__version__, torch.get_num_threads())
    table.add([Measurement(shapes["0"], fast, "tuning"), Measurement(shapes["1"], slow, "tuning")])
    table.rule = fit_rule([Measurement(shapes["1"], slow)])
    return table


def positive_mean_inputs(seed: int = 0) -> tuple[list[tuple[torch.Tensor]], torch.Tensor]:
    """Calibration batches and test inputs for `biased_depthwise`, with a large positive mean (5), so its
    rounded weights shift every output channel."""
    torch.manual_seed(seed)
    return [(5.0 + torch.randn(16, 8, 10, 10),) for _ in range(4)], 5.0 + torch.randn(64, 8, 10, 10)


def biased_depthwise() -> nn.Module:
    """A depthwise 3x3 conv whose weights all sit 0.4 of a step above the int8 grid (step = 1/127.5, the
    largest weight 1.0): rounding lowers every weight, so each channel's output error has the same sign."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)).eval()
    with torch.no_grad():
        model[0].weight.copy_((torch.randint(20, 100, (8, 1, 3, 3), generator=generator) + 0.4) / 127.5)
        model[0].weight[:, :, 0, 0] = 1.0
        model[0].bias.zero_()
    return model
