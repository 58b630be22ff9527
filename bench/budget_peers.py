"""The two peer recipes of bench/budget.py, run by the peers' own code on the benchmark's tensors.

  - lucidrains: denoising-diffusion-pytorch's documented recipe (README: Unet(dim=64) + GaussianDiffusion with its
    defaults, pred_v on the sigmoid schedule, DDIM with sampling_timesteps; the Trainer's defaults: Adam lr 1e-4,
    betas (0.9, 0.99), gradient clipping at 1, ema_pytorch EMA(beta=0.995, update_every=10)). Its Trainer reads an
    image folder, so its training step is driven here on our tensors, statement for statement as Trainer.train
    does it (loss = diffusion(images in [0, 1]), backward, clip, step, zero_grad, ema.update).
    Deviations, both forced by 28x28 digits: dim_mults (1, 2, 4) instead of (1, 2, 4, 8) (its U-Net needs sides
    divisible by 2^(levels-1)), and no horizontal flips (digits; the ddpm-lab preset has none either).
  - diffusers: examples/unconditional_image_generation/train_unconditional.py (UNet2DModel, layers_per_block 2;
    DDPMScheduler(1000, "linear", epsilon); AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8;
    get_scheduler("cosine", warm-up 500, to the last step); EMAModel(decay 0.9999, use_ema_warmup, inv_gamma 1,
    power 3/4); MSE on the noise, clipping at 1; random_flip off by default). Deviation forced by 28x28: its six
    levels (five down-samplings, 28 -> 14 -> 7 -> 4 breaks the skip shapes) become its first three widths
    (128, 128, 256) with its attention block on the next-to-last level, as in the original. Sampling: DDIMPipeline
    with a DDIMScheduler from the training scheduler's config, 50 steps, eta 0, on the EMA weights.

Each recipe is an object with `params`, `step(x_uint8)` (one optimizer step on a (B, 1, 28, 28) uint8 batch) and
`sample(n, batch_size, seed)` -> uint8 (n, 1, 28, 28).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 28


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 (the quantization of the saved PNGs)."""
    return (x01.float().clamp(0, 1) * 255).round().to(torch.uint8)


class Lucidrains:
    name = "lucidrains"

    def __init__(self, max_steps: int, seed: int = 0):
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA
        torch.manual_seed(seed)
        unet = Unet(dim=64, dim_mults=(1, 2, 4), channels=1)
        self.diffusion = GaussianDiffusion(unet, image_size=SIZE, timesteps=1000, sampling_timesteps=50)
        self.opt = torch.optim.Adam(self.diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        self.ema = EMA(self.diffusion, beta=0.995, update_every=10)
        self.params = sum(p.numel() for p in unet.parameters())

    def step(self, x: torch.Tensor) -> float:
        self.diffusion.train()
        loss = self.diffusion(x.float() / 255)             # auto_normalize maps [0, 1] to [-1, 1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.ema.update()
        return loss.item()

    @torch.inference_mode()
    def sample(self, n: int, batch_size: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)                              # its sampler draws from the global generator
        model = self.ema.ema_model.eval()
        out = [model.sample(batch_size=min(batch_size, n - i)) for i in range(0, n, batch_size)]
        return to_uint8(torch.cat(out))                      # sample() returns [0, 1]


class Diffusers:
    name = "diffusers"

    def __init__(self, max_steps: int, seed: int = 0):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        torch.manual_seed(seed)
        self.model = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=2,
                                 block_out_channels=(128, 128, 256),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                             prediction_type="epsilon")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                                     eps=1e-8)
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.opt, num_warmup_steps=500,
                                          num_training_steps=max_steps)
        self.ema = EMAModel(self.model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4, model_cls=UNet2DModel, model_config=self.model.config)
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, x: torch.Tensor) -> float:
        self.model.train()
        clean = x.float() / 127.5 - 1                        # Normalize([0.5], [0.5]) of ToTensor's [0, 1]
        noise = torch.randn(clean.shape)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(clean),)).long()
        pred = self.model(self.noise_scheduler.add_noise(clean, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def sample(self, n: int, batch_size: int, seed: int) -> torch.Tensor:
        from diffusers import DDIMPipeline, DDIMScheduler
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())           # sample with the EMA weights, as the script does
        try:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
            pipe = DDIMPipeline(unet=self.model.eval(), scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            out = []
            for b, i in enumerate(range(0, n, batch_size)):
                gen = torch.Generator().manual_seed(seed * 100003 + b)
                images = pipe(batch_size=min(batch_size, n - i), generator=gen, num_inference_steps=50, eta=0.0,
                              output_type="np").images      # (B, H, W, 1) in [0, 1]
                out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
        finally:
            self.ema.restore(self.model.parameters())
        return to_uint8(torch.cat(out))


PEERS = {"lucidrains": Lucidrains, "diffusers": Diffusers}


class Batches:
    """Batches of uint8 images in seeded random order, reshuffled each epoch (the last partial batch of an epoch
    is dropped): the same order for every peer."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0):
        self.images, self.batch_size = images, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(images), generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.generator), 0
        index = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.images[index]
