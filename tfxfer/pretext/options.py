"""The options of the built-in pretext methods, one dataclass per method.

They stand apart from the methods, which load TensorFlow, so that
`tfxfer pretrain --help` lists them without it. Each joins the `pretext`
config group here (`tfxfer.config.add_pretext_options`), and its method
names it as `PretextMethod.options`, as a method registered from outside does.
"""

import dataclasses

from tfxfer.config import add_pretext_options, option
from tfxfer.errors import TfxferError

__all__ = ["SupervisedOptions", "SimCLROptions", "AutoencoderOptions"]


@dataclasses.dataclass(frozen=True)
class SupervisedOptions:
    label_smoothing: float = option(0.0, "Supervised: label smoothing of the source labels.")

    def validate(self):
        if not 0 <= self.label_smoothing < 1:
            raise TfxferError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")


@dataclasses.dataclass(frozen=True)
class SimCLROptions:
    temperature: float = option(0.2, "SimCLR: temperature of the NT-Xent loss.")
    projection_dim: int = option(128, "SimCLR: output size of the projection head.")

    def validate(self):
        if not self.temperature > 0:
            raise TfxferError(f"temperature must be > 0, got {self.temperature}.")
        if self.projection_dim < 1:
            raise TfxferError(f"projection_dim must be at least 1, got {self.projection_dim}.")


@dataclasses.dataclass(frozen=True)
class AutoencoderOptions:
    denoise: float = option(0.0, "Autoencoder: std of Gaussian input noise, in [0, 1] pixel units.")

    def validate(self):
        if not self.denoise >= 0:  # also catches NaN
            raise TfxferError(f"denoise must be >= 0, got {self.denoise}.")


for _options in (SupervisedOptions, SimCLROptions, AutoencoderOptions):
    add_pretext_options(_options)
