"""Other formats: diffusers' UNet2DModel / DDPMScheduler both ways (diffusers), and published diffusers DDPM
weights by hub id or folder (pretrained). export.py and sample.py --pretrained are its command lines."""
from interop.diffusers import export_diffusers
from interop.pretrained import load_pretrained

__all__ = ["export_diffusers", "load_pretrained"]
