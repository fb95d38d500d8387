"""A small class-conditional diffusion teacher and BOOT's one-step student, built on `diffusers` (an optional
dependency: `pip install 'distill[diffusion]'`, imported when something here is built or called).

- `class_conditional_unet`: diffusers' `UNet2DModel` with a class embedding added to the time embedding.
- `noise_scheduler` / `ddim_scheduler`: the teacher's forward process (diffusers `DDPMScheduler`: 1000 steps,
  cosine schedule `squaredcos_cap_v2`, v-prediction, x_0 clipped to [-1, 1]) and its deterministic sampler
  (`DDIMScheduler`, eta 0, "trailing" spacing so the first step starts at t = 999 where x_T = eps is right).
- `denoising_loss`: the teacher's training loss (v-prediction MSE); `predict_x0`: its x_0 prediction.
- `ddim_sample`: the multi-step teacher, diffusers' own DDIM loop.
- `signal_grid`: the DDIM time grid of BOOT's bootstrapping, with alpha / sigma at each point.
- `SignalGenerator`: BOOT's student `g(eps, t, class)`, predicting the signal y_t from noise alone.

The maths of BOOT's loss is in `distill.losses.boot`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError

DIFFUSION_EXTRA = "pip install 'distill[diffusion]' (diffusers)"
TRAIN_TIMESTEPS = 1000


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise UserError(f"diffusion models need the diffusers package: {DIFFUSION_EXTRA}") from None
    return diffusers


def class_conditional_unet(
    *,
    sample_size: int = 28,
    channels: int = 1,
    widths: tuple[int, ...] = (16, 32, 32),
    layers_per_block: int = 1,
    num_classes: int = 10,
    norm_groups: int = 8,
) -> nn.Module:
    """A `UNet2DModel` taking (x, timestep, class_labels): plain ResNet blocks at every level (no attention
    but the middle block's), one downsampling between levels (28 -> 14 -> 7 for three widths)."""
    diffusers = _diffusers()
    if any(w % norm_groups for w in widths):
        raise UserError(f"diffusion: every width in {widths} must be a multiple of norm_groups={norm_groups}")
    levels = len(widths)
    return diffusers.UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        num_class_embeds=num_classes,
        norm_num_groups=norm_groups,
    )


def noise_scheduler() -> Any:
    """The teacher's forward process: diffusers `DDPMScheduler` (cosine schedule, v-prediction, clipping)."""
    return _diffusers().DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
    )


def ddim_scheduler(train: Any) -> Any:
    """The deterministic DDIM sampler of the schedule `train` (eta 0 at `step`), "trailing" spacing and
    alpha = 1 after the last step."""
    return _diffusers().DDIMScheduler.from_config(
        train.config, timestep_spacing="trailing", set_alpha_to_one=True
    )


def _alpha_sigma(scheduler: Any, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def _bcast(value: Tensor) -> Tensor:
    return value.reshape(-1, 1, 1, 1)


def denoising_loss(
    unet: nn.Module, scheduler: Any, images: Tensor, labels: Tensor, generator: torch.Generator
) -> Tensor:
    """The teacher's loss: MSE of the v-prediction `v = alpha eps - sigma x_0` at a uniform timestep."""
    timesteps = torch.randint(0, TRAIN_TIMESTEPS, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    noisy = scheduler.add_noise(images, noise, timesteps)
    target = scheduler.get_velocity(images, noise, timesteps)
    return (unet(noisy, timesteps, class_labels=labels).sample - target).pow(2).mean()


def predict_x0(unet: nn.Module, scheduler: Any, noisy: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
    """The teacher's prediction of x_0 from `noisy` at integer `timesteps`, clipped to [-1, 1] as its
    sampler clips it: `alpha x_t - sigma v`."""
    alpha, sigma = _alpha_sigma(scheduler, timesteps)
    velocity = unet(noisy, timesteps, class_labels=labels).sample
    return (_bcast(alpha) * noisy - _bcast(sigma) * velocity).clamp(-1, 1)


@torch.no_grad()
def ddim_sample(unet: nn.Module, sampler: Any, noise: Tensor, labels: Tensor, steps: int) -> Tensor:
    """`steps` deterministic DDIM steps from `x_T = noise` (diffusers' loop; eps is re-derived from the
    clipped x_0, which makes the loop exactly the signal steps of `distill.losses.boot`)."""
    sampler.set_timesteps(steps)
    sample = noise
    for t in sampler.timesteps:
        timestep = torch.full((len(noise),), int(t), dtype=torch.long)
        output = unet(sample, timestep, class_labels=labels).sample
        sample = sampler.step(output, int(t), sample, eta=0.0, use_clipped_model_output=True).prev_sample
    return sample


@dataclass(frozen=True)
class SignalGrid:
    """BOOT's time grid: point k = 0 .. K, k = 0 the clean end (alpha 1, sigma 0), k = K the first DDIM
    timestep (999). `timesteps[k]` is the teacher's integer timestep at point k (k >= 1; -1 at k = 0);
    `student_times[k]` the time the student reads (0 at k = 0)."""

    timesteps: Tensor
    alpha: Tensor
    sigma: Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def student_times(self) -> Tensor:
        return self.timesteps.clamp_min(0).float()


def signal_grid(sampler: Any, steps: int) -> SignalGrid:
    """The points of the `steps`-step DDIM trajectory of `sampler` (a `ddim_scheduler`), clean end first."""
    sampler.set_timesteps(steps)
    timesteps = torch.cat([torch.tensor([-1]), sampler.timesteps.flip(0).long()])
    alpha_bar = torch.cat([sampler.final_alpha_cumprod.reshape(1), sampler.alphas_cumprod[timesteps[1:]]])
    return SignalGrid(timesteps, alpha_bar.sqrt().float(), (1 - alpha_bar).clamp_min(0).sqrt().float())


class SignalGenerator(nn.Module):
    """BOOT's student: `g(eps, t, class) = alpha_T eps - sigma_T net(eps, t, class)`, the signal y_t of the
    trajectory that starts at `x_T = eps`. The output is read like the teacher's x_0 prediction at the first
    timestep T, so a student initialised with the teacher's weights starts as the teacher's one-step DDIM
    sample at every t; training moves each t along the trajectory."""

    def __init__(self, net: nn.Module, alpha_T: float, sigma_T: float) -> None:
        super().__init__()
        self.net = net
        self.alpha_T, self.sigma_T = float(alpha_T), float(sigma_T)

    def forward(self, noise: Tensor, times: Tensor, labels: Tensor) -> Tensor:
        return self.alpha_T * noise - self.sigma_T * self.net(noise, times, class_labels=labels).sample

    @torch.no_grad()
    def sample(self, noise: Tensor, labels: Tensor) -> Tensor:
        """One network evaluation: the signal at the clean end, y_0 = x_0."""
        return self(noise, torch.zeros(len(noise)), labels).clamp(-1, 1)
