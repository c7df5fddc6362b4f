"""ResNet50 in plain PyTorch (torchvision's layout, written out: PyPI's torchvision
does not import beside the CPU torch wheel here), for the benchmark's eager loop."""

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * 4
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.pool(self.layers(x)), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def freeze_batchnorm(model):
    """BatchNorm in inference mode with fixed parameters: tfxfer's default, per layer."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def training_step(size, batch, precision="float32", l2sp=0.0, phases=None, train_bn=False):
    """The classic eager step on one random batch: zero_grad, forward, loss (+ L2-SP), backward, step.

    ResNet50 from random weights with BatchNorm frozen (tfxfer's default for
    pretrained weights) or, with `train_bn`, training, SGD
    with momentum 0.9, channels-last input (the NHWC uint8 batch permuted, as
    the TensorFlow side's layout), `torch.autocast` for bfloat16. `phases`, a
    `name -> context manager` factory such as `torch.profiler.record_function`,
    labels the forward, l2sp, backward and optimizer parts. Returns `step()`.
    """
    import contextlib

    torch.manual_seed(0)
    model = ResNet50(10)
    model.train()
    if not train_bn:
        freeze_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    anchors = [(p, p.detach().clone()) for name, p in model.named_parameters()
               if p.requires_grad and p.dim() > 1 and not name.startswith("fc")]
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    labels = torch.arange(batch) % 10
    loss_fn = nn.CrossEntropyLoss()
    phase = phases or (lambda name: contextlib.nullcontext())

    def step():
        x = images.permute(0, 3, 1, 2).float() - 127.5  # the same preprocessing work as the TF side
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
                logits = model(x)
            loss = loss_fn(logits.float(), labels)
        if l2sp:
            with phase("l2sp"):
                loss = loss + l2sp * sum(((p - p0) ** 2).sum() for p, p0 in anchors)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()

    return step
