"""Gaussian diffusion: noise schedules, the forward process, the training loss and the samplers.

References (equation numbers are the papers'):
  [DDPM]  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  [iDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
  [DDIM]  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"
  [PD]    Salimans, Ho 2022, "Progressive Distillation" (v-prediction)
  [MSNR]  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
  [DPMS]  Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"

This module knows nothing of optimizers, files or devices beyond its own buffers: move it with
`Diffusion(...).to(device)` once, like a model. Shapes: x0, xt, eps are (B, ...) ; t is (B,) long.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from config import LOSS_WEIGHTINGS, OBJECTIVES, SAMPLERS, SCHEDULES, SPACINGS, VAR_TYPES, ConfigError


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Beta schedule in float64, shape (T,)."""
    if schedule == "linear":  # [DDPM] Sec. 4: betas linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":  # [iDDPM] Eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        # beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999 to avoid a singularity at t = T.
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def _choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")


class Diffusion(nn.Module):
    """Schedule buffers + forward process + loss + samplers. `model(xt, t, y=None)` is the only
    model interface; class label -1 means "no label" (the null label of classifier-free guidance)."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, objective: str = "eps", loss_weighting: str = "none",
                 min_snr_gamma: float = 5.0, var_type: str = "fixed_small",
                 timestep_spacing: str = "leading"):
        super().__init__()
        _choice("objective", objective, OBJECTIVES)
        _choice("loss weighting", loss_weighting, LOSS_WEIGHTINGS)
        _choice("variance type", var_type, VAR_TYPES)
        _choice("timestep spacing", timestep_spacing, SPACINGS)
        if num_timesteps < 1:
            raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps, self.objective = num_timesteps, objective
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.var_type, self.timestep_spacing = var_type, timestep_spacing

        # Everything is computed once in float64 and stored as float32 buffers.
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # [DDPM] Eq. 7: posterior q(x_{t-1} | x_t, x_0) = N(mean_coef1 x0 + mean_coef2 xt, beta_tilde)
        post_var = betas * (1 - abar_prev) / (1 - abar)
        buffers = {
            "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
            "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "posterior_variance": post_var,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "snr": abar / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_config(cls, dcfg) -> "Diffusion":
        return cls(dcfg.num_timesteps, dcfg.schedule, dcfg.beta_start, dcfg.beta_end, dcfg.objective,
                   dcfg.loss_weighting, dcfg.min_snr_gamma, dcfg.var_type, dcfg.timestep_spacing)

    # ------------------------------------------------------------------ coefficients
    @staticmethod
    def gather(coef: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """coef[t] shaped (B, 1, ..., 1) to broadcast against a (B, ...) tensor of `ndim` dims.
        t == -1 stands for "before the first step", where abar = 1 (used by the last DDIM step)."""
        out = torch.where(t >= 0, coef[t.clamp(min=0)], torch.ones_like(coef[0]))
        return out.view(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """[DDPM] Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self.gather(self.sqrt_abar, t, x0.ndim) * x0
                + self.gather(self.sqrt_one_minus_abar, t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """[DDPM] Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.gather(self.posterior_mean_coef1, t, xt.ndim) * x0
                + self.gather(self.posterior_mean_coef2, t, xt.ndim) * xt)
        return mean, self.gather(self.posterior_variance, t, xt.ndim)

    # ------------------------------------------------------------------ objectives
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output. v = sqrt(abar) eps - sqrt(1 - abar) x0 ([PD] Sec. 4)."""
        if self.objective == "eps":
            return eps
        if self.objective == "x0":
            return x0
        return (self.gather(self.sqrt_abar, t, x0.ndim) * eps
                - self.gather(self.sqrt_one_minus_abar, t, x0.ndim) * x0)

    def predict_x0_eps(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                       clip_x0: bool = False):
        """Model output -> (x0, eps) for every objective; the one conversion every sampler uses.
        Uses x_t = a x0 + s eps with a = sqrt(abar), s = sqrt(1 - abar), a^2 + s^2 = 1."""
        a = self.gather(self.sqrt_abar, t, xt.ndim)
        s = self.gather(self.sqrt_one_minus_abar, t, xt.ndim)
        if self.objective == "eps":
            eps = model_out
            x0 = (xt - s * eps) / a
        elif self.objective == "x0":
            x0 = model_out
            eps = (xt - a * x0) / s
        else:  # v: x0 = a xt - s v, eps = s xt + a v
            x0 = a * xt - s * model_out
            eps = s * xt + a * model_out
        if clip_x0:
            # Clamp x0 to the data range and re-derive eps so that (x0, eps) stay consistent with x_t.
            x0 = x0.clamp(-1, 1)
            eps = (xt - a * x0) / s
        return x0, eps

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Callable, x0: torch.Tensor, y: Optional[torch.Tensor] = None,
                        t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None):
        """Per-example weighted MSE, shape (B,), and the timesteps used, shape (B,)."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, y).float()
        mse = (out - self.target(x0, noise, t)).pow(2).flatten(1).mean(dim=1)  # (B,)
        return mse * self.loss_weight(t), t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """[MSNR] Eq. 9-10: weight min(SNR, gamma) on the x0-MSE, rewritten for each objective.
        The x0-MSE equals SNR * eps-MSE and (SNR + 1) * v-MSE."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.objective]

    def loss(self, model: Callable, x0: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar training loss: uniform t, Gaussian noise ([DDPM] Algorithm 1)."""
        return self.training_losses(model, x0, y)[0].mean()

    # ------------------------------------------------------------------ sampling
    def sampling_timesteps(self, sampler: str, steps: Optional[int] = None,
                           spacing: Optional[str] = None) -> list[int]:
        """Explicit, decreasing list of timesteps the sampler visits. Spacing defaults to the
        diffusion's (DDIM: "leading"), except for dpmpp2m, which defaults to "trailing": a grid that
        evaluates the model at t=0 gives the multistep solver one huge log-SNR step (t=k -> 0), where
        its second-order extrapolation is unstable (measured on the Gaussian oracle: std 0.61 instead
        of 0.50 at 20 steps); diffusers' DPM-Solver likewise ends at a positive t, then jumps to sigma=0."""
        _choice("sampler", sampler, SAMPLERS)
        T = self.num_timesteps
        if sampler == "ddpm":
            if steps not in (None, T):
                raise ConfigError(f"the ddpm sampler uses all T={T} steps, got steps={steps}; for fewer "
                                  "steps use sampler ddim (eta=1 is the ancestral equivalent) or dpmpp2m")
            return list(range(T - 1, -1, -1))
        steps = T if steps is None else steps
        if not 1 <= steps <= T:
            raise ConfigError(f"steps must be between 1 and num_timesteps={T}, got {steps}")
        spacing = spacing or ("trailing" if sampler == "dpmpp2m" else self.timestep_spacing)
        _choice("timestep spacing", spacing, SPACINGS)
        if spacing == "leading":      # [DDIM] Sec. D.2: 0, k, 2k, ... with k = T // steps
            ts = [i * (T // steps) for i in range(steps)]
        elif spacing == "trailing":   # ends exactly at T-1 (Lin et al. 2024, Table 2)
            ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
        else:                         # evenly spaced over [0, T-1], rounded
            ts = [round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)]
        return sorted(set(ts), reverse=True)

    def _model_fn(self, model: Callable, y: Optional[torch.Tensor], guidance_scale: float) -> Callable:
        """Wrap the model for classifier-free guidance (Ho & Salimans 2022, Eq. 6).
        Every objective's eps is affine in the model output for fixed x_t, so mixing raw outputs
        out_u + s (out_c - out_u) is the same as mixing eps."""
        if y is None or guidance_scale == 1.0:
            return lambda xt, t: model(xt, t, y).float()

        def guided(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            null = torch.full_like(y, -1)
            out = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null])).float()
            out_cond, out_uncond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)
        return guided

    @torch.no_grad()
    def sample(self, model: Callable, shape: tuple, sampler: str = "ddpm", steps: Optional[int] = None,
               eta: float = 0.0, x_T: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, y: Optional[torch.Tensor] = None,
               guidance_scale: float = 1.0, clip_x0: bool = True, progress: bool = True,
               callback: Optional[Callable] = None, timestep_spacing: Optional[str] = None) -> torch.Tensor:
        """Draw samples of `shape` = (B, ...). callback(i, t, x_t, x0_pred) is called after each step
        with the new x_t and the x0 predicted on the way."""
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        timesteps = self.sampling_timesteps(sampler, steps, timestep_spacing)
        device = self.betas.device
        xt = x_T.to(device) if x_T is not None else self._randn(shape, generator)
        model_fn = self._model_fn(model, y, guidance_scale)
        loop = {"ddpm": self._ddpm_loop, "ddim": self._ddim_loop, "dpmpp2m": self._dpmpp2m_loop}[sampler]
        it = tqdm(timesteps, desc=f"{sampler} sampling", leave=False, disable=not progress)
        return loop(model_fn, xt, list(it), eta=eta, generator=generator, clip_x0=clip_x0,
                    callback=callback)

    def _randn(self, shape, generator: Optional[torch.Generator]) -> torch.Tensor:
        # Draw on the generator's device (a CPU generator gives the same numbers on any device).
        gen_device = generator.device if generator is not None else self.betas.device
        return torch.randn(shape, generator=generator, device=gen_device).to(self.betas.device)

    def _predict(self, model_fn, xt, t_int: int, clip_x0: bool):
        t = torch.full((xt.shape[0],), t_int, device=xt.device, dtype=torch.long)
        x0, eps = self.predict_x0_eps(model_fn(xt, t), xt, t, clip_x0)
        return t, x0, eps

    def _ddpm_loop(self, model_fn, xt, timesteps, generator, clip_x0, callback, **_):
        """[DDPM] Algorithm 2, with the mean written through x0 (Eq. 7) so all objectives share it."""
        var = self.posterior_variance if self.var_type == "fixed_small" else self.betas
        for i, t_int in enumerate(timesteps):
            t, x0, _ = self._predict(model_fn, xt, t_int, clip_x0)
            mean, _ = self.q_posterior(x0, xt, t)
            if t_int > 0:  # no noise is added at the last step
                xt = mean + self.gather(var, t, xt.ndim).sqrt() * self._randn(xt.shape, generator)
            else:
                xt = mean
            if callback is not None:
                callback(i, t_int, xt, x0)
        return xt

    def _ddim_loop(self, model_fn, xt, timesteps, eta, generator, clip_x0, callback, **_):
        """[DDIM] Eq. 12 with sigma from Eq. 16; the last step goes to abar = 1 (t_prev = -1)."""
        for i, t_int in enumerate(timesteps):
            t, x0, eps = self._predict(model_fn, xt, t_int, clip_x0)
            t_prev = torch.full_like(t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
            abar = self.gather(self.alphas_cumprod, t, xt.ndim)
            abar_prev = self.gather(self.alphas_cumprod, t_prev, xt.ndim)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            xt = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(timesteps):  # the last step (to abar=1) has sigma = 0
                xt = xt + sigma * self._randn(xt.shape, generator)
            if callback is not None:
                callback(i, t_int, xt, x0)
        return xt

    def _dpmpp2m_loop(self, model_fn, xt, timesteps, clip_x0, callback, **_):
        """[DPMS] Algorithm 2 (DPM-Solver++(2M)), a data-prediction multistep solver in
        lambda = log(alpha/sigma). The last step goes to abar = 1 (sigma = 0), where x = x0."""
        x0_prev, h_prev = None, None
        for i, t_int in enumerate(timesteps):
            t, x0, _ = self._predict(model_fn, xt, t_int, clip_x0)
            t_next = torch.full_like(t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
            abar, abar_next = (self.gather(self.alphas_cumprod, s, xt.ndim) for s in (t, t_next))
            if i + 1 == len(timesteps):
                xt_new = x0  # sigma_next = 0: first-order final step lands on the data prediction
            else:
                lam, lam_next = (0.5 * torch.log(a / (1 - a)) for a in (abar, abar_next))
                h = lam_next - lam
                d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
                # x_{t_next} = (sigma_next / sigma) x_t - alpha_next (e^{-h} - 1) D
                ratio = ((1 - abar_next) / (1 - abar)).sqrt()
                xt_new = ratio * xt - abar_next.sqrt() * torch.expm1(-h) * d
                x0_prev, h_prev = x0, h
            xt = xt_new
            if callback is not None:
                callback(i, t_int, xt, x0)
        return xt


def build_diffusion(cfg) -> Diffusion:
    """Diffusion from a full Config (uses cfg.diffusion)."""
    return Diffusion.from_config(cfg.diffusion)

