"""What one sample.py command does, as library calls that sample.py and app.py share: the parser of its flags,
the checks before anything loads, the model source (--checkpoint / --pretrained), and a run (sampling, an editing
mode) that writes the output folder. The page (webapp/) builds a sample.py argument list, parses it with the same
parser and runs it here, so the command it shows writes the same PNGs byte for byte.
Layer: above the features (it runs editing/ and interop/), below the scripts and webapp/."""
from commands.sample_command import (Source, build_parser, check_request, load_source, parse_device, run_forward,
                                     run_request, run_sampling)

__all__ = ["Source", "build_parser", "check_request", "load_source", "parse_device", "run_forward", "run_request",
           "run_sampling"]
