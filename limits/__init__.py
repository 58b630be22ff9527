"""Cost checks before anything is allocated (issue #23): the parameters and activation memory of a config
(measured on torch's meta device), the memory, work and disk of a sampling or editing request, and the limit
this machine allows (--memory-limit / --max-model-calls raise it). A request that cannot fit is a CostError:
one line with the estimate, the limit and the fix. Layer: config, storage and the core below; sampling, the
feature packages and the scripts above."""
from limits.budget import (CostError, add_limit_args, apply_limit_args, check_disk, check_memory,
                           check_model_calls, human_bytes, memory_limit, set_limits)
from limits.cost import activation_bytes, parameter_count, sampling_memory, training_memory
from limits.requests import check_model, check_parameters, check_sampling, check_training

__all__ = ["CostError", "activation_bytes", "add_limit_args", "apply_limit_args", "check_disk", "check_memory",
           "check_model", "check_model_calls", "check_parameters", "check_sampling", "check_training",
           "human_bytes", "memory_limit", "parameter_count", "sampling_memory", "set_limits", "training_memory"]
