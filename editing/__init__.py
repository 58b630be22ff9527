"""Editing a user's images with a trained model, over the public Diffusion API: RePaint inpainting, DDIM
inversion and SDEdit as free functions (algorithms), and sample.py's editing modes that read the images, run
them and write the results (modes). Its own package, so that training never loads it."""
from editing.algorithms import edit, inpaint, invert, repaint_schedule

__all__ = ["edit", "inpaint", "invert", "repaint_schedule"]
