"""The chapter 7-8 CNN family of "Deep Learning with PyTorch", for 3x32x32 inputs.

This file is self-contained (it imports torch only): `tvserve archive checkpoint` ships it
inside the `.mar`, and the TorchServe worker rebuilds the model from it by name.

Every model takes a normalised Tensor[N, 3, 32, 32] and returns logits Tensor[N, n_classes].
"""

import torch
import torch.nn.functional as F
from torch import nn


class NetWidth(nn.Module):
    """Net with `n_chans1` channels in the first conv and half as many in the second."""

    def __init__(self, n_classes: int = 2, n_chans1: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * (n_chans1 // 2), 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = torch.flatten(out, 1)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


class Net(NetWidth):
    """The book's baseline: conv 3->16, tanh, maxpool, conv 16->8, tanh, maxpool, fc 512->32,
    tanh, fc 32->n_classes. It is NetWidth with 16 channels: the same layers, keys and forward."""

    def __init__(self, n_classes: int = 2):
        super().__init__(n_classes, n_chans1=16)


class NetDropout(nn.Module):
    """NetWidth with Dropout2d(p=0.4) after each pooling."""

    def __init__(self, n_classes: int = 2, n_chans1: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv1_dropout = nn.Dropout2d(p=0.4)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.conv2_dropout = nn.Dropout2d(p=0.4)
        self.fc1 = nn.Linear(8 * 8 * (n_chans1 // 2), 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        out = self.conv1_dropout(F.max_pool2d(torch.tanh(self.conv1(x)), 2))
        out = self.conv2_dropout(F.max_pool2d(torch.tanh(self.conv2(out)), 2))
        out = torch.flatten(out, 1)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


class NetBatchNorm(nn.Module):
    """NetWidth with BatchNorm2d after each conv, before the activation."""

    def __init__(self, n_classes: int = 2, n_chans1: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv1_batchnorm = nn.BatchNorm2d(n_chans1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.conv2_batchnorm = nn.BatchNorm2d(n_chans1 // 2)
        self.fc1 = nn.Linear(8 * 8 * (n_chans1 // 2), 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1_batchnorm(self.conv1(x))), 2)
        out = F.max_pool2d(torch.tanh(self.conv2_batchnorm(self.conv2(out))), 2)
        out = torch.flatten(out, 1)
        out = torch.tanh(self.fc1(out))
        return self.fc2(out)


class NetDepth(nn.Module):
    """A third conv stage (ReLU activations, as in the book)."""

    def __init__(self, n_classes: int = 2, n_chans1: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 // 2, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(n_chans1 // 2, n_chans1 // 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * (n_chans1 // 2), 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        out = F.max_pool2d(torch.relu(self.conv2(out)), 2)
        out = F.max_pool2d(torch.relu(self.conv3(out)), 2)
        out = torch.flatten(out, 1)
        out = torch.relu(self.fc1(out))
        return self.fc2(out)


class NetRes(NetDepth):
    """NetDepth whose third conv has a skip connection around it."""

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        out = F.max_pool2d(torch.relu(self.conv2(out)), 2)
        out = F.max_pool2d(torch.relu(self.conv3(out)) + out, 2)
        out = torch.flatten(out, 1)
        out = torch.relu(self.fc1(out))
        return self.fc2(out)


class ResBlock(nn.Module):
    """conv3x3 (no bias) -> batch norm -> ReLU, plus the input."""

    def __init__(self, n_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(n_chans, n_chans, kernel_size=3, padding=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(n_chans)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.constant_(self.batch_norm.weight, 0.5)
        nn.init.zeros_(self.batch_norm.bias)

    def forward(self, x):
        return torch.relu(self.batch_norm(self.conv(x))) + x


class NetResDeep(nn.Module):
    """A conv stem, `n_blocks` ResBlocks and two linear layers.

    Unlike the book's `n_blocks * [ResBlock(...)]`, which repeats one block object and so
    shares its weights, each block here has its own weights.
    """

    def __init__(self, n_classes: int = 2, n_chans1: int = 32, n_blocks: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.resblocks = nn.Sequential(*(ResBlock(n_chans1) for _ in range(n_blocks)))
        self.fc1 = nn.Linear(8 * 8 * n_chans1, 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        out = F.max_pool2d(self.resblocks(out), 2)
        out = torch.flatten(out, 1)
        out = torch.relu(self.fc1(out))
        return self.fc2(out)


ARCHITECTURES = {
    cls.__name__: cls
    for cls in (Net, NetWidth, NetDropout, NetBatchNorm, NetDepth, NetRes, NetResDeep)
}
INPUT_SIZE = 32  # every model above expects 3x32x32 images


def build_model(arch: str, **arch_args) -> nn.Module:
    """Returns a fresh `arch` model; `arch_args` are its constructor's keyword arguments."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}. Choose one of: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[arch](**arch_args)
