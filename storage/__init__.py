"""Everything ddpm-lab reads from or writes to disk, below the core: where outputs go (paths), checkpoints (save
atomically, load as untrusted input, list, resolve), run folders and their lock, sample.py's output manifest,
and the readers of untrusted data files. It imports only config."""
from storage.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from storage.paths import RunPaths

__all__ = ["CheckpointError", "RunPaths", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]
